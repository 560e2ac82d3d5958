from OpenSSL import SSL

from gehirn_ts.mta.tls import make_self_signed, server_options


def test_server_options_refuse_tls_before_1_2(tmp_path):
    make_self_signed(tmp_path / "c.pem", tmp_path / "k.pem", "mx.test")
    ctx = server_options(tmp_path / "c.pem", tmp_path / "k.pem").getContext()
    options = ctx.set_options(0)  # OpenSSL returns the options in force
    assert options & SSL.OP_NO_SSLv3
    assert options & SSL.OP_NO_TLSv1
    assert options & SSL.OP_NO_TLSv1_1
    assert not options & SSL.OP_NO_TLSv1_2


def test_dev_key_is_private(tmp_path):
    make_self_signed(tmp_path / "c.pem", tmp_path / "k.pem", "mx.test")
    assert oct((tmp_path / "k.pem").stat().st_mode & 0o777) == "0o600"
    assert b"BEGIN CERTIFICATE" in (tmp_path / "c.pem").read_bytes()
