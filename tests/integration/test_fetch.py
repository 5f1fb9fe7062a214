"""Checkpoints fetched over HTTP by a host that does not mount the store: a real HTTP server on
localhost serves a real checkpoint store; what is fetched is verified, cached, evicted, and a
tampered, oversized, escaping or unreachable version is refused without leaving a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import CheckpointEvent, FileDigest
from services.models.fetch import CheckpointSource, CheckpointSourceSettings, CheckpointUnavailable
from services.models.manifest import CheckpointRefused
from tests.integration.runners import http_server

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[CheckpointEvent]]:
    """Versions 1 to 4 of a tiny model, with optimizer state, in a store folder."""
    import torch

    from services.models.engines import TransformersEngine
    from services.models.tiny import tiny_model
    from services.trainer.store import CheckpointStore

    tmp = tmp_path_factory.mktemp("fetch")
    engine = TransformersEngine(tiny_model(tmp / "base", seed=2))
    optimizer = torch.optim.AdamW(engine.model.parameters(), lr=1e-3)
    root = tmp / "store"
    store = CheckpointStore(str(root))
    events = []
    for version in range(1, 5):
        with torch.no_grad():
            next(engine.model.parameters()).add_(0.01)
        engine.model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        optimizer.step()
        uri, manifest = store.write(version, engine.model, engine.tokenizer, optimizer)
        events.append(CheckpointEvent(model="policy", version=version, uri=uri,
                                      manifest=manifest, status="promoted"))
    return root, events


def _source(tmp_path: Path, url: str, owner: str = "", **kw: object) -> CheckpointSource:
    empty = tmp_path / "not-mounted"  # this host's checkpoint_root: nothing in it
    empty.mkdir(parents=True, exist_ok=True)
    return CheckpointSource(empty, CheckpointSourceSettings(
        url=url, cache_dir=tmp_path / "cache", **kw), owner)  # type: ignore[arg-type]


def test_a_version_is_fetched_verified_served_from_the_cache_and_evicted(
        store: tuple[Path, list[CheckpointEvent]], tmp_path: Path) -> None:
    import torch

    from services.models.engines import SamplingParams, TransformersEngine

    root, events = store
    with http_server(root) as (url, requested):
        source = _source(tmp_path, url, keep=2)
        folder = source.resolve(events[0])
        assert folder.is_relative_to((tmp_path / "cache").resolve())
        fetched = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert fetched == {e.path for e in events[0].manifest
                           if not e.path.startswith("optimizer/")}
        assert any(e.path.startswith("optimizer/") for e in events[0].manifest)
        served, original = TransformersEngine(folder), TransformersEngine(Path(events[0].uri))
        for a, b in zip(served.model.parameters(), original.model.parameters(), strict=True):
            assert torch.equal(a, b)
        greedy = SamplingParams(temperature=0.0, max_tokens=4)
        assert [c.token_ids for c in served.generate([[1, 5, 6]], greedy, [0])] == \
            [c.token_ids for c in original.generate([[1, 5, 6]], greedy, [0])]
        count = len(requested)
        assert source.resolve(events[0]) == folder and len(requested) == count  # cached
        for event in events[1:3]:
            source.resolve(event)
        cached = sorted(p.name for p in (tmp_path / "cache" / "policy").iterdir())
        assert cached == ["v000002", "v000003"]  # keep=2: the oldest evicted
        served = source.resolve(events[1])  # cached; say it is the version being served
        source.resolve(events[3], in_use=[served])
        cached = sorted(p.name for p in (tmp_path / "cache" / "policy").iterdir())
        assert cached == ["v000002", "v000004"]  # the one in use stays, though older
        other = _source(tmp_path, url, owner="generator-1")  # another process on the host
        assert other.resolve(events[0]).is_relative_to(tmp_path / "cache" / "generator-1")
        assert served.is_dir()


def test_a_tampered_oversized_escaping_or_unreachable_version_is_refused(
        store: tuple[Path, list[CheckpointEvent]], tmp_path: Path) -> None:
    root, events = store
    event = events[3]
    weights = next(e for e in event.manifest if e.path.endswith(".safetensors")
                   and not e.path.startswith("optimizer/"))
    path = root / Path(event.uri).name / weights.path
    original = path.read_bytes()
    home = tmp_path / "cache" / "policy"
    try:
        with http_server(root) as (url, _):
            source = _source(tmp_path, url)
            path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit flipped
            with pytest.raises(CheckpointRefused) as refused:
                source.resolve(event)
            assert refused.value.reason == "sha256"
            assert not home.exists() or not any(home.iterdir())  # nothing half-kept
            path.write_bytes(original + b"more")
            with pytest.raises(CheckpointRefused) as refused:
                source.resolve(event)
            assert refused.value.reason == "size"
            path.unlink()
            with pytest.raises(CheckpointRefused) as refused:  # a 404, not an outage
                source.resolve(event)
            assert refused.value.reason == "missing"
            path.write_bytes(original)
            escaping = event.model_copy(update={"manifest": [
                *event.manifest, FileDigest(path="../../outside.json", sha256="0" * 64,
                                            size_bytes=2)]})
            with pytest.raises(CheckpointRefused) as refused:
                source.resolve(escaping)
            assert refused.value.reason == "outside_root"
            assert not (tmp_path / "outside.json").exists()
            assert source.resolve(event).name == "v000004"  # the intact copy passes
        failing = {f"/{Path(events[2].uri).name}/{weights.path}"}
        with http_server(root, failing) as (url, requested):  # answers 503: not refused
            flaky = _source(tmp_path / "flaky", url, attempts=2)
            with pytest.raises(CheckpointUnavailable, match="503"):
                flaky.resolve(events[2])
            assert requested.count(next(iter(failing))) >= 2  # retried
            failing.clear()  # the store recovers: the same version is fetched
            assert flaky.resolve(events[2]).name == "v000003"
        down = _source(tmp_path / "other", url, attempts=2)  # the server is gone
        with pytest.raises(CheckpointUnavailable):
            down.resolve(events[0])
    finally:
        path.write_bytes(original)
