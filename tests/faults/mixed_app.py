"""A long-lived application for the fault tests: Python calling libcrypto through ctypes in its
own library context (keyx preferred, the default provider beside it). Usage:

    python3 mixed_app.py OPENSSL_CNF EC_KEY_URI RSA_KEY_URI

loads the two keys once, prints "ready", then answers one line per command read on stdin:
keygen (an ephemeral P-256 key made by keyx, derived with a default-provider peer), derive (the
EC key with a fresh default-provider peer), decrypt (RSA OAEP-SHA256 of what the default
provider encrypted to the RSA key's public half), sign (ECDSA SHA-256 with the EC key, verified by
the default provider). Every result is cross-checked by the default provider; the answer is
"ok" or "err <keyx's error texts>" (or "bad ..." for a wrong result). Secrets are never printed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kxutil  # noqa: E402

# the bindings every test script shares (ctypes, fn, L, LIB_*, EVP keygen/derive, public_copy)
exec(kxutil.LIBCRYPTO_CTYPES)

enc_init = fn("EVP_PKEY_encrypt_init", c_int, c_void_p)
enc = fn("EVP_PKEY_encrypt", c_int, c_void_p, c_char_p, POINTER(c_size_t), c_char_p, c_size_t)
dec_init = fn("EVP_PKEY_decrypt_init", c_int, c_void_p)
dec = fn("EVP_PKEY_decrypt", c_int, c_void_p, c_char_p, POINTER(c_size_t), c_char_p, c_size_t)
set_pad = fn("EVP_PKEY_CTX_set_rsa_padding", c_int, c_void_p, c_int)
set_oaep_md = fn("EVP_PKEY_CTX_set_rsa_oaep_md_name", c_int, c_void_p, c_char_p, c_char_p)
md_new = fn("EVP_MD_CTX_new", c_void_p)
md_free = fn("EVP_MD_CTX_free", None, c_void_p)
sign_init = fn("EVP_DigestSignInit_ex", c_int, c_void_p, c_void_p, c_char_p, c_void_p, c_char_p, c_void_p,
               c_void_p)
sign = fn("EVP_DigestSign", c_int, c_void_p, c_char_p, POINTER(c_size_t), c_char_p, c_size_t)
verify_init = fn("EVP_DigestVerifyInit_ex", c_int, c_void_p, c_void_p, c_char_p, c_void_p, c_char_p,
                 c_void_p, c_void_p)
verify = fn("EVP_DigestVerify", c_int, c_void_p, c_char_p, c_size_t, c_char_p, c_size_t)
rand = fn("RAND_bytes", c_int, c_char_p, c_int)
st_open = fn("OSSL_STORE_open_ex", c_void_p, c_char_p, c_void_p, c_char_p, c_void_p, c_void_p, c_void_p,
             c_void_p, c_void_p)
st_load = fn("OSSL_STORE_load", c_void_p, c_void_p)
st_close = fn("OSSL_STORE_close", c_int, c_void_p)
info_pkey = fn("OSSL_STORE_INFO_get1_PKEY", c_void_p, c_void_p)
info_free = fn("OSSL_STORE_INFO_free", None, c_void_p)
get_err = fn("ERR_get_error_all", ctypes.c_ulong, POINTER(c_char_p), POINTER(c_int), POINTER(c_char_p),
             POINTER(c_char_p), POINTER(c_int))
DEFAULT = b"provider=default"


def errs():
    out = []
    while True:
        f, ln, fu, data, fl = c_char_p(), c_int(), c_char_p(), c_char_p(), c_int()
        e = get_err(byref(f), byref(ln), byref(fu), byref(data), byref(fl))
        if not e:
            return " | ".join(out) or "no error recorded"
        lib = L.ERR_lib_error_string
        lib.restype, lib.argtypes = c_char_p, [ctypes.c_ulong]
        rs = L.ERR_reason_error_string
        rs.restype, rs.argtypes = c_char_p, [ctypes.c_ulong]
        out.append(f"{(lib(e) or b'?').decode()}:{(rs(e) or b'?').decode()}:{(data.value or b'').decode()}")


ctx = LIB_new()
assert LIB_load(ctx, sys.argv[1].encode()) == 1, errs()



def load(uri):
    st = st_open(uri.encode(), ctx, None, None, None, None, None, None)
    assert st, f"cannot open {uri}: {errs()}"
    info = st_load(st)
    k = info_pkey(info) if info else None
    info_free(info)
    st_close(st)
    assert k, f"no key at {uri}: {errs()}"
    return k


def gen(group, propq=None):
    c = CTX_name(ctx, b"EC", propq)
    k = c_void_p()
    ok = c and kg_init(c) == 1 and set_group(c, group.encode()) == 1 and generate(c, byref(k)) == 1
    CTX_free(c)
    return k.value if ok else None


def derive(key, peer, propq=None):
    c = CTX_pkey(ctx, key, propq)
    n = c_size_t(0)
    ok = c and d_init(c) == 1 and d_peer(c, peer) == 1 and d_derive(c, None, byref(n)) == 1
    buf = ctypes.create_string_buffer(max(n.value, 1))
    ok = ok and d_derive(c, buf, byref(n)) == 1
    CTX_free(c)
    return buf.raw[: n.value] if ok else None


def keygen():
    k = gen("P-256")
    if not k:
        return f"err {errs()}"
    p = gen("P-256", DEFAULT)
    pub = public_copy(k)
    got, want = derive(k, p), derive(p, pub, DEFAULT)
    for x in (k, p, pub):
        pkey_free(x)
    return "ok" if got is not None and got == want else (f"err {errs()}" if got is None else "bad secret")


def derive_static(ec, ec_pub):
    p = gen("P-256", DEFAULT)
    got, want = derive(ec, p), derive(p, ec_pub, DEFAULT)
    pkey_free(p)
    return "ok" if got is not None and got == want else (f"err {errs()}" if got is None else "bad secret")


def rsa_ctx(key, propq, init):
    c = CTX_pkey(ctx, key, propq)
    if not (c and init(c) == 1 and set_pad(c, 4) == 1 and set_oaep_md(c, b"SHA256", None) == 1):
        CTX_free(c)
        return None
    return c


def decrypt(rsa, rsa_pub):
    msg = ctypes.create_string_buffer(32)
    rand(msg, 32)
    c = rsa_ctx(rsa_pub, DEFAULT, enc_init)
    n = c_size_t(0)
    assert c and enc(c, None, byref(n), msg.raw, 32) == 1
    ct = ctypes.create_string_buffer(n.value)
    assert enc(c, ct, byref(n), msg.raw, 32) == 1
    CTX_free(c)
    c = rsa_ctx(rsa, None, dec_init)
    m = c_size_t(0)
    ok = c is not None and dec(c, None, byref(m), ct.raw[: n.value], n.value) == 1
    out = ctypes.create_string_buffer(max(m.value, 1))
    ok = ok and dec(c, out, byref(m), ct.raw[: n.value], n.value) == 1
    CTX_free(c)
    if not ok:
        return f"err {errs()}"
    return "ok" if out.raw[: m.value] == msg.raw else "bad plaintext"


def signature(ec, ec_pub):
    data = ctypes.create_string_buffer(100)
    rand(data, 100)
    m = md_new()
    n = c_size_t(0)
    ok = sign_init(m, None, b"SHA256", ctx, None, ec, None) == 1 and sign(m, None, byref(n), data.raw, 100) == 1
    sig = ctypes.create_string_buffer(max(n.value, 1))
    ok = ok and sign(m, sig, byref(n), data.raw, 100) == 1
    md_free(m)
    if not ok:
        return f"err {errs()}"
    m = md_new()
    good = verify_init(m, None, b"SHA256", ctx, DEFAULT, ec_pub, None) == 1 and \
        verify(m, sig.raw[: n.value], n.value, data.raw, 100) == 1
    md_free(m)
    return "ok" if good else "bad signature"


def main():
    ec, rsa = load(sys.argv[2]), load(sys.argv[3])
    ec_pub, rsa_pub = public_copy(ec), public_copy(rsa)
    assert ec_pub and rsa_pub, errs()
    print("ready", flush=True)
    ops = {"keygen": keygen, "derive": lambda: derive_static(ec, ec_pub),
           "decrypt": lambda: decrypt(rsa, rsa_pub), "sign": lambda: signature(ec, ec_pub)}
    for line in sys.stdin:
        op = line.strip()
        if op:
            print(f"{op} {ops[op]()}", flush=True)
    for k in (ec, rsa, ec_pub, rsa_pub):
        pkey_free(k)
    LIB_free(ctx)


main()
