import pytest

from loader.reference import Reference, ReferenceError, cache_key, parse, speaks_plain_http

H = "a" * 64


@pytest.mark.parametrize(
    "text,expected",
    [
        ("registry.example.com/models/phi3:v1", Reference("registry.example.com", "models/phi3", "v1")),
        ("127.0.0.1:5000/m/x", Reference("127.0.0.1:5000", "m/x", "latest")),
        ("localhost/m", Reference("localhost", "m", "latest")),
        (f"r.io/a/b@sha256:{H}", Reference("r.io", "a/b", None, f"sha256:{H}")),
        (f"r.io:443/a/b:t@sha256:{H}", Reference("r.io:443", "a/b", "t", f"sha256:{H}")),
        ("ollama/llama", Reference("docker.io", "ollama/llama", "latest")),
        ("busybox:1", Reference("docker.io", "library/busybox", "1")),
        ("[::1]:5000/m:v", Reference("[::1]:5000", "m", "v")),
    ],
    ids=["tag", "port-no-tag", "localhost", "digest", "tag-and-digest", "hub", "hub-library", "ipv6"],
)
def test_parse(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("", "empty reference"),
        ("https://r.io/a:b", "URL scheme"),
        ("r.io/A/b", "repository 'A/b'"),
        ("r.io/a@sha256:xyz", "digest 'sha256:xyz'"),
        ("r.io/a:-bad", "tag '-bad'"),
        ("r.io/a//b", "repository 'a//b'"),
    ],
    ids=["empty", "scheme", "uppercase", "bad-digest", "bad-tag", "empty-component"],
)
def test_parse_errors_name_value_and_fix(text, fragment):
    with pytest.raises(ReferenceError) as e:
        parse(text)
    assert fragment in str(e.value)


def test_roundtrip_and_loopback():
    r = parse("127.0.0.1:5000/models/phi3:v1")
    assert str(r) == "127.0.0.1:5000/models/phi3:v1"
    assert speaks_plain_http(r.registry, ()) and r.name == "phi3" and r.reference == "v1"
    assert not speaks_plain_http(parse("r.io/x").registry, ())


def test_cache_key_is_one_component_stable_and_distinct():
    a = cache_key("r.io/models/phi3:v1")
    b = cache_key("r.io/models/phi3:v2")
    assert a != b and "/" not in a and a.startswith("r.io_models_phi3_v1-")
    assert cache_key(parse("r.io/models/phi3:v1")) == a
    assert cache_key("r.io/models/phi3:v1") == "r.io_models_phi3_v1-" + __import__("hashlib").sha256(
        b"r.io/models/phi3:v1"
    ).hexdigest()[:16]


PINNED_NEWLINE = "registry.example.com/models/phi3:v1\n@sha256:" + "a" * 64


@pytest.mark.parametrize(
    "text,message",
    [
        ("registry.example.com/models/phi3:v\u0661",
         "reference 'registry.example.com/models/phi3:v\u0661' has tag 'v\u0661': a tag is up to 128 ASCII letters,"
         " digits, '_', '.' or '-' and does not start with '.' or '-'"),
        ("registry.example.com/models/phi3:\uff561",
         "reference 'registry.example.com/models/phi3:\uff561' has tag '\uff561': a tag is up to 128 ASCII letters,"
         " digits, '_', '.' or '-' and does not start with '.' or '-'"),
        (PINNED_NEWLINE,
         f"reference {PINNED_NEWLINE[:80]!r}... (108 characters) has tag 'v1\\n': a tag is up to 128 ASCII letters, digits, '_', '.' or '-' and does not"
         " start with '.' or '-'"),
        ("registry.example.com/models/phi3\n:v1",
         "reference 'registry.example.com/models/phi3\\n:v1' has repository 'models/phi3\\n': use lowercase letters,"
         " digits and separators ('.', '_', '__', '-') between '/'-separated components"),
        ("registry.example.com:5000\n/models/phi3:v1",
         "reference 'registry.example.com:5000\\n/models/phi3:v1' has registry host 'registry.example.com:5000\\n',"
         " which is not a valid host[:port]"),
        ("registry.example.com/models/phi3:v1\x85",
         "reference 'registry.example.com/models/phi3:v1\\x85' has tag 'v1\\x85': a tag is up to 128 ASCII letters,"
         " digits, '_', '.' or '-' and does not start with '.' or '-'"),
    ],
    ids=["arabic-indic-digit", "fullwidth-letter", "newline-in-tag", "newline-in-repository", "newline-after-port",
         "nel-at-end"],
)
def test_grammars_are_ascii_only_and_matched_whole(text, message):
    with pytest.raises(ReferenceError) as exc:
        parse(text)
    assert str(exc.value) == message


def test_ascii_whitespace_around_a_reference_is_dropped():
    assert str(parse(" registry.example.com/models/phi3:v1\r\n")) == "registry.example.com/models/phi3:v1"
