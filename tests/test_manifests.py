"""Manifest parsing and foreign-layer classification (proxy/manifests.py): pure functions, no I/O."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.manifests import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    FOREIGN_MEDIA_TYPES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ForeignClassifier,
    ForeignLayer,
    Manifest,
    ManifestError,
    digest_lines,
    is_digest,
    parse_diff_ids,
    parse_manifest,
)

DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
CUSTOM_FOREIGN = "application/vnd.example.foreign.layer"
FOREIGN_URL = "https://mcr.microsoft.com/v2/windows/blobs/sha256:00"

Json = None | bool | int | float | str | list["Json"] | dict[str, "Json"]


def digest(number: int) -> str:
    return f"sha256:{number:064x}"


def descriptor(media_type: str, number: int, size: int = 1000, urls: list[str] | None = None) -> dict[str, Json]:
    raw: dict[str, Json] = {"mediaType": media_type, "digest": digest(number), "size": size}
    if urls is not None:
        raw["urls"] = list(urls)
    return raw


def image_document(
    layers: list[dict[str, Json]], media_type: str | None = OCI_MANIFEST, config_type: str = OCI_CONFIG
) -> dict[str, Json]:
    document: dict[str, Json] = {"schemaVersion": 2, "config": descriptor(config_type, 9999, 300)}
    if media_type is not None:
        document["mediaType"] = media_type
    document["layers"] = list(layers)
    return document


def index_document(children: list[dict[str, Json]], media_type: str | None = OCI_INDEX) -> dict[str, Json]:
    document: dict[str, Json] = {"schemaVersion": 2}
    if media_type is not None:
        document["mediaType"] = media_type
    document["manifests"] = list(children)
    return document


def encode(document: Json) -> bytes:
    return json.dumps(document).encode()


TWO_LAYERS = [descriptor(DOCKER_FOREIGN, 1, 5, [FOREIGN_URL]), descriptor(DOCKER_LAYER, 2, 7)]
TWO_CHILDREN = [descriptor(DOCKER_MANIFEST, 11, 500), descriptor(OCI_MANIFEST, 12, 600)]


# Kinds of manifest ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "expected_type"),
    [
        pytest.param(encode(image_document(TWO_LAYERS, DOCKER_MANIFEST, DOCKER_CONFIG)), None, DOCKER_MANIFEST,
                     id="docker-manifest-declared"),
        pytest.param(encode(image_document(TWO_LAYERS)), None, OCI_MANIFEST, id="oci-manifest-declared"),
        pytest.param(encode(image_document(TWO_LAYERS, None)), OCI_MANIFEST, OCI_MANIFEST,
                     id="oci-manifest-from-content-type"),
        pytest.param(encode(image_document(TWO_LAYERS, None)), DOCKER_MANIFEST, DOCKER_MANIFEST,
                     id="docker-manifest-from-content-type"),
        pytest.param(encode(image_document(TWO_LAYERS, None)), None, OCI_MANIFEST, id="oci-manifest-from-shape"),
        pytest.param(encode(image_document(TWO_LAYERS, None)), "application/json", OCI_MANIFEST,
                     id="oci-manifest-from-shape-despite-generic-content-type"),
        pytest.param(encode(image_document(TWO_LAYERS, None)), f"{OCI_MANIFEST.upper()} ; charset=utf-8",
                     OCI_MANIFEST, id="content-type-case-and-parameters-ignored"),
    ],
)
def test_image_manifests_are_parsed(body: bytes, content_type: str | None, expected_type: str) -> None:
    manifest = parse_manifest(body, content_type)

    assert manifest.media_type == expected_type
    assert not manifest.is_index
    assert manifest.children == ()
    assert manifest.config is not None and manifest.config.digest == digest(9999)
    assert manifest.layers == (
        Descriptor(DOCKER_FOREIGN, digest(1), 5, (FOREIGN_URL,)),
        Descriptor(DOCKER_LAYER, digest(2), 7, ()),
    )


@pytest.mark.parametrize(
    ("body", "content_type", "expected_type"),
    [
        pytest.param(encode(index_document(TWO_CHILDREN, DOCKER_MANIFEST_LIST)), None, DOCKER_MANIFEST_LIST,
                     id="docker-list-declared"),
        pytest.param(encode(index_document(TWO_CHILDREN)), None, OCI_INDEX, id="oci-index-declared"),
        pytest.param(encode(index_document(TWO_CHILDREN, None)), DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_LIST,
                     id="docker-list-from-content-type"),
        pytest.param(encode(index_document(TWO_CHILDREN, None)), None, OCI_INDEX, id="oci-index-from-shape"),
    ],
)
def test_indexes_are_parsed(body: bytes, content_type: str | None, expected_type: str) -> None:
    manifest = parse_manifest(body, content_type)

    assert manifest.media_type == expected_type
    assert manifest.is_index
    assert manifest.config is None
    assert manifest.layers == ()
    assert [child.digest for child in manifest.children] == [digest(11), digest(12)]


def test_declared_media_type_wins_over_content_type() -> None:
    body = encode(image_document(TWO_LAYERS, DOCKER_MANIFEST))

    assert parse_manifest(body, OCI_INDEX).media_type == DOCKER_MANIFEST


def test_manifest_without_layers_has_none() -> None:
    document = image_document([])
    del document["layers"]

    assert parse_manifest(encode(document)).layers == ()


def test_foreign_layers_of_a_parsed_docker_manifest() -> None:
    body = encode(image_document(TWO_LAYERS, DOCKER_MANIFEST, DOCKER_CONFIG))

    assert ForeignClassifier().foreign_layers(parse_manifest(body)) == (
        ForeignLayer(digest(1), DOCKER_FOREIGN, 5, (FOREIGN_URL,)),
    )


# What is not a manifest -----------------------------------------------------------------------------


def with_layer(**changes: Json) -> bytes:
    layer = descriptor(DOCKER_FOREIGN, 1)
    layer.update(changes)
    return encode(image_document([layer]))


def without_layer_key(key: str) -> bytes:
    layer = descriptor(DOCKER_FOREIGN, 1)
    del layer[key]
    return encode(image_document([layer]))


def without_config() -> bytes:
    document = image_document(TWO_LAYERS)
    del document["config"]
    return encode(document)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(b"", None, id="empty"),
        pytest.param(b"{", None, id="truncated-json"),
        pytest.param(b"\xff\xfe\x00{", None, id="not-utf8"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, None, id="deeply-nested"),
        pytest.param(b"[]", None, id="json-array"),
        pytest.param(b'"manifest"', None, id="json-string"),
        pytest.param(b"null", None, id="json-null"),
        pytest.param(b"{}", None, id="empty-object"),
        pytest.param(b'{"schemaVersion": 2}', OCI_MANIFEST + "x", id="no-shape-unknown-content-type"),
        pytest.param(encode({"schemaVersion": 1, "name": "a", "tag": "b", "fsLayers": []}), None, id="schema1"),
        pytest.param(encode(image_document(TWO_LAYERS, "application/vnd.docker.distribution.manifest.v1+prettyjws")),
                     None, id="schema1-declared"),
        pytest.param(encode(image_document(TWO_LAYERS, "application/vnd.example.artifact")), OCI_MANIFEST,
                     id="unknown-declared-type"),
        pytest.param(without_config(), None, id="no-config"),
        pytest.param(encode({**image_document(TWO_LAYERS), "config": "sha256:00"}), None, id="config-not-object"),
        pytest.param(encode({**image_document([]), "layers": {"0": descriptor(OCI_LAYER, 1)}}), None,
                     id="layers-not-list"),
        pytest.param(encode(image_document(["layer"])), None, id="layer-not-object"),  # type: ignore[list-item]
        pytest.param(without_layer_key("digest"), None, id="layer-without-digest"),
        pytest.param(without_layer_key("mediaType"), None, id="layer-without-media-type"),
        pytest.param(without_layer_key("size"), None, id="layer-without-size"),
        pytest.param(with_layer(digest="sha256:" + "A" * 64), None, id="digest-uppercase-hex"),
        pytest.param(with_layer(digest="sha256:" + "a" * 63), None, id="digest-short"),
        pytest.param(with_layer(digest="md5:" + "a" * 32), None, id="digest-unknown-algorithm"),
        pytest.param(with_layer(mediaType=7), None, id="media-type-not-string"),
        pytest.param(with_layer(size=-1), None, id="size-negative"),
        pytest.param(with_layer(size=True), None, id="size-bool"),
        pytest.param(with_layer(size=1.5), None, id="size-float"),
        pytest.param(with_layer(size="10"), None, id="size-string"),
        pytest.param(with_layer(urls=FOREIGN_URL), None, id="urls-string"),
        pytest.param(with_layer(urls=None), None, id="urls-null"),
        pytest.param(with_layer(urls=[FOREIGN_URL, 5]), None, id="urls-non-string-item"),
        pytest.param(encode(index_document([{"mediaType": OCI_MANIFEST}])), None, id="index-child-without-digest"),
        pytest.param(encode({**index_document([]), "manifests": "none"}), None, id="index-children-not-list"),
    ],
)
def test_what_is_not_a_manifest_raises_manifest_error(body: bytes, content_type: str | None) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(body, content_type)


def test_size_limit_is_inclusive() -> None:
    body = encode(image_document(TWO_LAYERS))
    at_limit = body + b" " * (MAX_MANIFEST_BYTES - len(body))

    assert len(parse_manifest(at_limit).layers) == 2
    with pytest.raises(ManifestError, match="4 MiB"):
        parse_manifest(at_limit + b" ")


# Properties ------------------------------------------------------------------------------------------

json_values: st.SearchStrategy[Json] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=25,
)
media_types = st.sampled_from(
    sorted(FOREIGN_MEDIA_TYPES) + [DOCKER_LAYER, OCI_LAYER, DOCKER_MANIFEST, OCI_MANIFEST, OCI_INDEX,
                                   DOCKER_MANIFEST_LIST, CUSTOM_FOREIGN, ""]
)
manifest_values: st.SearchStrategy[Json] = st.one_of(
    json_values,
    media_types,
    st.builds(digest, st.integers(0, 2**256 - 1)),
    st.lists(st.text(max_size=10), max_size=3),
)
manifest_like_descriptors = st.dictionaries(
    st.sampled_from(["mediaType", "digest", "size", "urls", "annotations"]), manifest_values, max_size=5
)
manifest_like_documents = st.dictionaries(
    st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "manifests", "subject"]),
    st.one_of(manifest_values, manifest_like_descriptors, st.lists(manifest_like_descriptors, max_size=3)),
    max_size=6,
)
content_types = st.one_of(st.none(), media_types, st.text(max_size=30))


def parses_or_raises_manifest_error(body: bytes, content_type: str | None) -> None:
    try:
        manifest = parse_manifest(body, content_type)
    except ManifestError:
        return
    assert isinstance(manifest, Manifest)
    assert (manifest.config is None) == manifest.is_index


@given(st.binary(max_size=200), content_types)
def test_arbitrary_bytes_only_ever_raise_manifest_error(body: bytes, content_type: str | None) -> None:
    parses_or_raises_manifest_error(body, content_type)


@given(json_values, content_types)
def test_arbitrary_json_only_ever_raises_manifest_error(document: Json, content_type: str | None) -> None:
    parses_or_raises_manifest_error(encode(document), content_type)


@given(manifest_like_documents, content_types)
def test_manifest_shaped_json_only_ever_raises_manifest_error(
    document: dict[str, Json], content_type: str | None
) -> None:
    parses_or_raises_manifest_error(encode(document), content_type)


LayerSpec = tuple[str, int, int, tuple[str, ...] | None]

layer_specs: st.SearchStrategy[list[LayerSpec]] = st.lists(
    st.tuples(
        media_types,
        st.integers(0, 2**256 - 1),
        st.integers(0, 2**40),
        st.none() | st.lists(st.text(max_size=15), max_size=2).map(tuple),
    ),
    max_size=8,
)


def spec_document(specs: list[LayerSpec], kind: str = OCI_MANIFEST) -> bytes:
    layers = [descriptor(media_type, number, size, None if urls is None else list(urls))
              for media_type, number, size, urls in specs]
    return encode(image_document(layers, kind))


@given(layer_specs, st.sampled_from([DOCKER_MANIFEST, OCI_MANIFEST]))
def test_every_foreign_layer_of_a_valid_manifest_round_trips(specs: list[LayerSpec], kind: str) -> None:
    manifest = parse_manifest(spec_document(specs, kind))
    expected = tuple(
        ForeignLayer(digest(number), media_type, size, urls or ())
        for media_type, number, size, urls in specs
        if media_type in FOREIGN_MEDIA_TYPES
    )

    assert manifest.media_type == kind
    assert [layer.digest for layer in manifest.layers] == [digest(number) for _, number, _, _ in specs]
    assert ForeignClassifier().foreign_layers(manifest) == expected


@given(
    layer_specs,
    st.frozensets(st.sampled_from([CUSTOM_FOREIGN, OCI_LAYER, "text/plain"]), max_size=2),
    st.booleans(),
)
def test_classifier_marks_exactly_foreign_types_extras_and_urls_when_asked(
    specs: list[LayerSpec], extras: frozenset[str], urls_mark_foreign: bool
) -> None:
    classifier = ForeignClassifier(FOREIGN_MEDIA_TYPES | extras, urls_mark_foreign)
    manifest = parse_manifest(spec_document(specs))
    expected = [
        digest(number)
        for media_type, number, _, urls in specs
        if media_type in FOREIGN_MEDIA_TYPES or media_type in extras or (urls_mark_foreign and bool(urls))
    ]

    assert [layer.digest for layer in manifest.layers if classifier.is_foreign(layer)] == expected
    assert [foreign.digest for foreign in classifier.foreign_layers(manifest)] == expected


# Classification table --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("classifier", "layer", "foreign"),
    [
        *[
            pytest.param(ForeignClassifier(), Descriptor(media_type, digest(1), 1), True, id=f"default-{media_type}")
            for media_type in sorted(FOREIGN_MEDIA_TYPES)
        ],
        pytest.param(ForeignClassifier(), Descriptor(DOCKER_LAYER, digest(1), 1), False, id="docker-layer"),
        pytest.param(ForeignClassifier(), Descriptor(OCI_LAYER, digest(1), 1), False, id="oci-layer"),
        pytest.param(ForeignClassifier(), Descriptor(CUSTOM_FOREIGN, digest(1), 1), False, id="extra-not-configured"),
        pytest.param(ForeignClassifier(FOREIGN_MEDIA_TYPES | {CUSTOM_FOREIGN}), Descriptor(CUSTOM_FOREIGN, digest(1), 1),
                     True, id="extra-configured"),
        pytest.param(ForeignClassifier(FOREIGN_MEDIA_TYPES | {CUSTOM_FOREIGN}), Descriptor(DOCKER_FOREIGN, digest(1), 1),
                     True, id="extra-keeps-defaults"),
        pytest.param(ForeignClassifier(), Descriptor(OCI_LAYER, digest(1), 1, (FOREIGN_URL,)), False,
                     id="urls-ignored-by-default"),
        pytest.param(ForeignClassifier(urls_mark_foreign=True), Descriptor(OCI_LAYER, digest(1), 1, (FOREIGN_URL,)),
                     True, id="urls-mark-foreign"),
        pytest.param(ForeignClassifier(urls_mark_foreign=True), Descriptor(OCI_LAYER, digest(1), 1), False,
                     id="urls-mark-foreign-without-urls"),
    ],
)
def test_classifier(classifier: ForeignClassifier, layer: Descriptor, foreign: bool) -> None:
    assert classifier.is_foreign(layer) is foreign


@pytest.mark.parametrize(
    ("diff_ids", "expected_diff_ids"),
    [
        pytest.param((digest(101), digest(102), digest(103)), (digest(101), digest(103)), id="aligned"),
        pytest.param((digest(101), digest(102)), (None, None), id="too-few"),
        pytest.param((digest(101), digest(102), digest(103), digest(104)), (None, None), id="too-many"),
        pytest.param((), (None, None), id="none"),
    ],
)
def test_diff_ids_are_attached_only_when_aligned(
    diff_ids: tuple[str, ...], expected_diff_ids: tuple[str | None, ...]
) -> None:
    layers = [descriptor(DOCKER_FOREIGN, 1), descriptor(DOCKER_LAYER, 2), descriptor(OCI_NONDISTRIBUTABLE, 3)]
    manifest = parse_manifest(encode(image_document(layers)))

    foreign = ForeignClassifier().foreign_layers(manifest, diff_ids)

    assert [layer.digest for layer in foreign] == [digest(1), digest(3)]
    assert tuple(layer.diff_id for layer in foreign) == expected_diff_ids


# Small helpers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("sha256:" + "0123456789abcdef" * 4, True, id="sha256"),
        pytest.param("sha512:" + "0123456789abcdef" * 8, True, id="sha512"),
        pytest.param("sha256:" + "0123456789ABCDEF" * 4, False, id="sha256-uppercase"),
        pytest.param("sha256:" + "a" * 63, False, id="sha256-short"),
        pytest.param("sha256:" + "a" * 65, False, id="sha256-long"),
        pytest.param("sha256:" + "a" * 128, False, id="sha256-with-sha512-length"),
        pytest.param("sha512:" + "a" * 64, False, id="sha512-with-sha256-length"),
        pytest.param("sha256:" + "g" * 64, False, id="not-hex"),
        pytest.param("SHA256:" + "a" * 64, False, id="algorithm-uppercase"),
        pytest.param("sha384:" + "a" * 96, False, id="sha384"),
        pytest.param("a" * 64, False, id="no-algorithm"),
        pytest.param("sha256:" + "a" * 64 + "\n", False, id="trailing-newline"),
        pytest.param("", False, id="empty"),
        pytest.param(None, False, id="none"),
        pytest.param(("sha256:" + "a" * 64).encode(), False, id="bytes"),
        pytest.param(256, False, id="int"),
    ],
)
def test_is_digest(value: object, expected: bool) -> None:
    assert is_digest(value) is expected


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param(encode({"rootfs": {"type": "layers", "diff_ids": [digest(1), digest(2)]}}),
                     (digest(1), digest(2)), id="diff-ids"),
        pytest.param(encode({"rootfs": {"diff_ids": []}}), (), id="empty-list"),
        pytest.param(encode({"rootfs": {"diff_ids": [digest(1), "sha256:nope"]}}), (), id="one-invalid"),
        pytest.param(encode({"rootfs": {"diff_ids": digest(1)}}), (), id="not-a-list"),
        pytest.param(encode({"rootfs": [digest(1)]}), (), id="rootfs-not-object"),
        pytest.param(encode({"architecture": "amd64"}), (), id="no-rootfs"),
        pytest.param(encode([digest(1)]), (), id="json-array"),
        pytest.param(b"{", (), id="invalid-json"),
        pytest.param(b"\xff", (), id="not-utf8"),
        pytest.param(b"[" * 100_000, (), id="deeply-nested"),
    ],
)
def test_parse_diff_ids(config: bytes, expected: tuple[str, ...]) -> None:
    assert parse_diff_ids(config) == expected


@given(st.binary(max_size=100) | json_values.map(encode))
def test_parse_diff_ids_never_raises(config: bytes) -> None:
    assert all(is_digest(item) for item in parse_diff_ids(config))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(f"{digest(1)}\n{digest(2)}\n", [digest(1), digest(2)], id="one-per-line"),
        pytest.param(f"# foreign layers\n\n{digest(1)}\n   \n", [digest(1)], id="comments-and-blank-lines"),
        pytest.param(f"  {digest(1)}  # windows base\n", [digest(1)], id="inline-comment-and-spaces"),
        pytest.param(f"{digest(1)}\r\n{digest(2)}", [digest(1), digest(2)], id="crlf-and-no-final-newline"),
        pytest.param(f"#{digest(1)}\n", [], id="commented-out"),
        pytest.param("", [], id="empty"),
    ],
)
def test_digest_lines(text: str, expected: list[str]) -> None:
    assert list(digest_lines(text)) == expected


def test_keys_are_read_case_insensitively_as_the_registry_reads_them() -> None:
    """Go's JSON decoder (the registry's) matches keys regardless of case: so must the classifier."""
    foreign = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    body = json.dumps(
        {
            "SchemaVersion": 2,
            "MEDIATYPE": "application/vnd.docker.distribution.manifest.v2+json",
            "Config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "a" * 64, "size": 1},
            "Layers": [{"MediaType": foreign, "Digest": "sha256:" + "b" * 64, "SIZE": 5, "URLS": ["https://x.invalid/"]}],
        }
    ).encode()
    layers = ForeignClassifier().foreign_layers(parse_manifest(body))
    assert [(layer.digest, layer.urls) for layer in layers] == [("sha256:" + "b" * 64, ("https://x.invalid/",))]
