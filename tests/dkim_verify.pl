#!/usr/bin/perl
# Verify the DKIM signatures of the message on stdin with Perl's Mail::DKIM (Debian's
# libmail-dkim-perl), asking the tests' DNS server: dkim_verify.pl DNS_PORT.
# Prints one line per signature: "RESULT DOMAIN SELECTOR ALGORITHM".
use strict;
use warnings;
use Net::DNS::Resolver;
use Mail::DKIM::Verifier;

my $resolver = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0],
                                       recurse => 0);
Mail::DKIM::DNS::resolver($resolver);
my $dkim = Mail::DKIM::Verifier->new();
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $dkim->PRINT($line);
}
$dkim->CLOSE;
foreach my $sig ($dkim->signatures) {
    printf "%s %s %s %s\n", $sig->result, $sig->domain, $sig->selector, $sig->algorithm;
}
