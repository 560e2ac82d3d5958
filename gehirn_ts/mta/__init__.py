"""The MTA: the ESMTP server, policy, spool, inbound processing and (later) delivery."""
