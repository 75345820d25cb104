"""Key pairs keyx makes without a view, as libssl makes its key shares.

keyx keeps an X25519/X448 key of its software backend as the default provider's key object and
its raw public key, and a P-256/P-384 key a PKCS#11 token generated as the token's key and its
point; it makes the key's EVP_PKEY view only when something asks for one (a SubjectPublicKeyInfo,
a PEM private key). Every way of reading one key must agree, and with the default provider,
which is the independent reference here: the public key libssl sends (no view), the secret with
a peer set from its raw key share (no view), the key's SubjectPublicKeyInfo (the view) and, for
software keys, the private key written out, as the default provider reads and uses them; the
group's parameters copied from the key (libssl's client makes its peer this way); and views made
by threads racing on a fresh key.
"""

import pytest

import kxutil

APP = kxutil.LIBCRYPTO_CTYPES + r"""
import threading
get_pub = fn("EVP_PKEY_get1_encoded_public_key", c_size_t, c_void_p, POINTER(POINTER(ctypes.c_ubyte)))
set_pub = fn("EVP_PKEY_set1_encoded_public_key", c_int, c_void_p, c_char_p, c_size_t)
pg_init = fn("EVP_PKEY_paramgen_init", c_int, c_void_p)
mem_new = fn("BIO_new", c_void_p, c_void_p); mem_method = fn("BIO_s_mem", c_void_p)
ctrl = fn("BIO_ctrl", ctypes.c_long, c_void_p, c_int, ctypes.c_long, c_void_p)
bio_write = fn("BIO_write", c_int, c_void_p, c_char_p, c_int)
write_key = fn("PEM_write_bio_PrivateKey", c_int, c_void_p, c_void_p, c_void_p, c_void_p, c_int,
               c_void_p, c_void_p)
prov_of = lambda k: prov_name(get_prov(k)).decode()
alg, group, kind, cnf = sys.argv[1:5]
d2i_ex = fn("d2i_PUBKEY_ex", c_void_p, c_void_p, POINTER(POINTER(ctypes.c_ubyte)), ctypes.c_long, c_void_p, c_char_p)
copy_params = fn("EVP_PKEY_copy_parameters", c_int, c_void_p, c_void_p)
pkey_new = fn("EVP_PKEY_new", c_void_p)
get_bits = fn("EVP_PKEY_get_bits", c_int, c_void_p)
get_secbits = fn("EVP_PKEY_get_security_bits", c_int, c_void_p)
get_size = fn("EVP_PKEY_get_size", c_int, c_void_p)
keyx = LIB_new(); LIB_load(keyx, cnf.encode())
dflt = LIB_new()  # the default provider alone

def fail(what):
    print_errors(); sys.exit(what)

def keygen(lib):
    ctx, key = CTX_name(lib, alg.encode(), None), c_void_p()
    if not ctx or kg_init(ctx) != 1 or set_group(ctx, group.encode()) != 1 or generate(ctx, byref(key)) != 1:
        fail(f"{alg} keygen failed")
    CTX_free(ctx); return key

def encoded(key):
    buf = POINTER(ctypes.c_ubyte)()
    n = get_pub(key, byref(buf))
    if n == 0: fail("no encoded public key")
    out = ctypes.string_at(buf, n); ossl_free(buf, None, 0); return out

def peer_from_share(lib, share):
    # libssl's way with a key share: an empty key of the group, then its encoded public key
    ctx, key = CTX_name(lib, alg.encode(), None), c_void_p()
    if not ctx or pg_init(ctx) != 1 or set_group(ctx, group.encode()) != 1 or \
            generate(ctx, byref(key)) != 1 or set_pub(key, share, len(share)) != 1:
        fail("peer key share refused")
    CTX_free(ctx); return key

def derive(lib, own, peer):
    ctx, n = CTX_pkey(lib, own, None), c_size_t(0)
    if not ctx or d_init(ctx) != 1 or d_peer(ctx, peer) != 1 or d_derive(ctx, None, byref(n)) != 1:
        fail("derive set-up failed")
    out = ctypes.create_string_buffer(n.value)
    if d_derive(ctx, out, byref(n)) != 1: fail("derive failed")
    CTX_free(ctx); return out.raw[:n.value]

def pem_private(key):
    b = mem_new(mem_method())
    if write_key(b, key, None, None, 0, None, None) != 1: fail("private key not written")
    p = c_char_p(); n = ctrl(b, 3, 0, byref(p))  # BIO_CTRL_INFO: the memory's bytes
    out = ctypes.string_at(p, n); bio_free(b); return out

def read_private(lib, pem):
    b = mem_new(mem_method()); bio_write(b, pem, len(pem))
    k = read_pem(b, None, None, None, lib, None); bio_free(b)
    if not k: fail("the default provider cannot read keyx's private key")
    return k

def spki(key):  # a SubjectPublicKeyInfo: encoded from the key's view
    buf = POINTER(ctypes.c_ubyte)(); n = i2d(key, byref(buf))
    out = ctypes.string_at(buf, n) if n > 0 else b""; ossl_free(buf, None, 0); return out

def from_spki(lib, der):
    p = ctypes.cast(ctypes.create_string_buffer(der, len(der)), POINTER(ctypes.c_ubyte))
    k = d2i_ex(None, byref(p), len(der), lib, None)
    if not k: fail("the default provider cannot read keyx's SubjectPublicKeyInfo")
    return k

ours, theirs = keygen(keyx), keygen(dflt)
if prov_of(ours) != "keyx" or prov_of(theirs) != "default": sys.exit("wrong providers")
# the sizes libssl caches at generation, as the default provider reports them for its own key
sizes = lambda k: (get_bits(k), get_secbits(k), get_size(k))
if sizes(ours) != sizes(theirs): sys.exit(f"sizes {sizes(ours)} differ from {sizes(theirs)}")
share, their_share = encoded(ours), encoded(theirs)
if len(share) != len(their_share): sys.exit(f"public key of {len(share)} bytes")
z = derive(keyx, ours, peer_from_share(keyx, their_share))
# the default provider with the public key keyx sent: the same secret
if derive(dflt, theirs, peer_from_share(dflt, share)) != z: sys.exit("secret differs from the default provider's")
# a key on the group's parameters copied from ours, before anything made its view (libssl's
# client makes its peer so)
if alg == "EC":
    fresh = pkey_new()
    if copy_params(fresh, ours) != 1 or set_pub(fresh, their_share, len(their_share)) != 1:
        fail("parameters not copied from the key")
    if derive(keyx, ours, fresh) != z: sys.exit("a peer on the copied parameters derives another secret")
# the view, as a SubjectPublicKeyInfo: the same public key to the default provider
if encoded(from_spki(dflt, spki(ours))) != share: sys.exit("the view has another public key")
if kind == "software":
    # the private key written out (the view) is the same key to the default provider
    copy = read_private(dflt, pem_private(ours))
    if encoded(copy) != share: sys.exit("the written private key has another public key")
    if derive(dflt, copy, peer_from_share(dflt, their_share)) != z: sys.exit("the written private key derives another secret")
# threads racing on fresh keys for their view: every one sees the same key
for _ in range(20):
    k = keygen(keyx); want = encoded(k); seen = []
    ts = [threading.Thread(target=lambda: seen.append(spki(k))) for _ in range(6)]
    for t in ts: t.start()
    for t in ts: t.join()
    if len(seen) != 6 or len(set(seen)) != 1 or not seen[0].endswith(want):
        sys.exit("threads saw different or no views")
    pkey_free(k)
print("agree")
"""


@pytest.mark.parametrize("alg", ["X25519", "X448"])
def test_software_key_without_a_view_agrees(cnf, alg):
    conf = cnf(keyx={"backends": "software"})
    r = kxutil.run(["/usr/bin/python3", "-c", APP, alg, alg, "software", conf], env=kxutil.base_env())
    assert r.rc == 0 and r.out.strip() == "agree", r.out + r.err


@pytest.mark.parametrize("group", ["P-256", "P-384"])
def test_token_key_without_a_view_agrees(softhsm, cnf, group):
    conf = cnf(keyx=softhsm.keyx_settings())
    r = kxutil.run(["/usr/bin/python3", "-c", APP, "EC", group, "token", conf], env=softhsm.env())
    assert r.rc == 0 and r.out.strip() == "agree", r.out + r.err
