"""keyx(7), docs/keyx.7: every configuration key that provider/config.c accepts (its key table,
parsed from the source) has its entry under CONFIGURATION with its default and its environment
variable, and its variable an entry under ENVIRONMENT; the page names no key keyx does not know;
it renders without a groff warning (as lintian checks it); its version is the project's.
"""

import os
import re

import kxutil
from kxutil import CONFIG_KEYS, run

MANPAGE = kxutil.REPO / "docs" / "keyx.7"
CONFIG_C = kxutil.REPO / "provider" / "config.c"


def source_keys():
    """{key: variable} from the key table of provider/config.c (`static const key_def keys[]`)."""
    src = CONFIG_C.read_text()
    m = re.search(r"static const key_def keys\[\] = \{(.*?)\n\};", src, re.S)
    assert m, f"no key table (static const key_def keys[]) in {CONFIG_C}"
    keys = dict(re.findall(r'\{"([a-z0-9-]+)",\s*"(KEYX_[A-Z0-9_]+)",', m.group(1)))
    # Every entry of the table is a {"name", "VARIABLE", ...} line: none was missed by the pattern.
    assert len(keys) == m.group(1).count('{"') and keys, f"cannot read the key table of {CONFIG_C}"
    return keys


def sections():
    """{section name: its roff source} of the man page."""
    parts = re.split(r'^\.SH "?([^"\n]+)"?$', MANPAGE.read_text(), flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def entries(roff):
    """{tag: body} of the .TP entries of a section, the tag's first word unescaped, bodies as
    plain text (roff's \\- and font escapes removed, macro names dropped)."""
    out = {}
    for tag, body in re.findall(r"^\.TP\n(.+)\n((?:(?!\.TP\n|\.PP\n|\.SS ).*\n?)*)", roff, re.M):
        word = re.sub(r"\\f[BIRP]|^\.B[RI]? ", "", tag).replace("\\-", "-").split()[0]
        text = re.sub(r"\\f[BIRP]", "", body).replace("\\-", "-")
        out[word] = re.sub(r"^\.[A-Z]{1,2} ?", "", text, flags=re.M)
    return out


def test_config_table_is_the_suites():
    """The suite's own key list (kxutil.CONFIG_KEYS, which the configuration tests go through) is
    the source's: a new key gets its tests as well as its man page entry."""
    assert source_keys() == CONFIG_KEYS


def test_every_key_has_its_entry():
    keys = source_keys()
    documented = entries(sections()["CONFIGURATION"])
    assert set(documented) == set(keys), (
        f"keys in provider/config.c without an entry under CONFIGURATION in docs/keyx.7: "
        f"{sorted(set(keys) - set(documented))}; entries for keys keyx does not know: "
        f"{sorted(set(documented) - set(keys))}")
    for key, var in keys.items():
        body = documented[key]
        assert "Default:" in body, f"keyx.7: the entry of {key} gives no default:\n{body}"
        assert re.search(rf"Variable:\s*\n?{var}\b", body), f"keyx.7: the entry of {key} does not name {var}:\n{body}"


def test_every_variable_has_its_entry():
    keys = source_keys()
    documented = entries(sections()["ENVIRONMENT"])
    for key, var in keys.items():
        assert var in documented, f"keyx.7: {var} ({key}) has no entry under ENVIRONMENT"
        assert documented[var].rstrip(" .\n") == key, f"keyx.7: {var}'s entry does not name {key}: {documented[var]!r}"
    stray = {v for v in documented if v.startswith("KEYX_")} - set(keys.values())
    assert not stray, f"keyx.7 documents variables keyx does not read: {sorted(stray)}"


def test_sections():
    names = list(sections())
    for name in ("NAME", "SYNOPSIS", "DESCRIPTION", "CONFIGURATION", "URIS AND KEY FILES", "AUDIT LOG",
                 "ENVIRONMENT", "FILES", "EXAMPLES", "SEE ALSO"):
        assert name in names, f"keyx.7 has no {name} section: {names}"
    see_also = sections()["SEE ALSO"]
    for ref in ("config (5)", "provider (7)", "openssl\\-genpkey (1)"):
        assert f".BR {ref}" in see_also, f"keyx.7's SEE ALSO lacks {ref}"


def test_renders_without_warnings():
    """As lintian runs it (man --warnings, UTF-8), at 80 columns and at lintian's width."""
    for width in ("80", "120"):
        env = {"PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8", "MANWIDTH": width, "MANROFFSEQ": ""}
        r = run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", MANPAGE], env=env, timeout=60)
        assert r.rc == 0 and not r.err.strip(), f"groff warnings in docs/keyx.7 at {width} columns:\n{r!r}"
    r = run(["man", "-l", MANPAGE], env={"PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8", "MANPAGER": "cat"},
            timeout=60).ok("man -l docs/keyx.7")
    assert "KEYX_PKCS11_PIN" in r.out and "keyx - OpenSSL 3 provider" in r.out, r


def test_version_is_the_projects():
    m = re.search(r'^\.TH KEYX 7 \S+ "keyx ([0-9.]+)"', MANPAGE.read_text(), re.M)
    assert m and m.group(1) == kxutil.project_version(), (
        f"docs/keyx.7's .TH line does not carry CMakeLists.txt's version {kxutil.project_version()}")
