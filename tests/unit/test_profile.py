"""Profiles: the embedded default and the example for real runs validate, service by service;
a wrong setting is named before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.errors import ConfigError
from services.up import prepare
from services.up.profile import SERVICES, Profile, kafka_from_env, load_profile, public
from services.up.stack import Stack

EXAMPLE = Path(__file__).parents[2] / "deploy" / "profiles" / "cluster.yaml"


def test_the_embedded_profile_validates_and_makes_one_process_per_service(
        tmp_path: Path) -> None:
    stack = Stack(Profile(home=tmp_path, generators=2))
    stack.kafka = {"bootstrap_servers": "127.0.0.1:1"}
    stack.policy_files = prepare.write_policies(stack.profile)
    prepare.validate(stack.profile, stack.kafka, stack.policy_files)
    stack.base_path = tmp_path / "seed"
    specs = stack.specs()
    assert [s.name for s in specs] == ["feeder", "generator-0", "generator-1", "scorer",
                                       "filter", "router", "trainer", "gate"]
    assert stack.profile.processes == len(specs)
    gen = specs[1].env
    assert gen["FLYWHEEL_MODEL_PATH"] == str(tmp_path / "seed")
    assert gen["FLYWHEEL_INSTANCE_ID"] == "generator-0"
    assert '"temperature": 1.0' in gen["FLYWHEEL_SAMPLING"]
    assert len({s.env["FLYWHEEL_METRICS__PORT"] for s in specs}) == len(specs)
    assert specs[4].env["FLYWHEEL_POLICY_FILE"].endswith("policies/filter.yaml")


def test_every_service_trusts_the_gates_key_and_only_the_gate_holds_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without FLYWHEEL_DECISIONS__* the stack makes a pair in its home, once."""
    from services.common.signing import Signer, Verifier

    for name in ("FLYWHEEL_DECISIONS__PUBLIC_KEY", "FLYWHEEL_DECISIONS__SIGNING_KEY"):
        monkeypatch.delenv(name, raising=False)
    stack = Stack(Profile(home=tmp_path))
    stack.kafka = {"bootstrap_servers": "127.0.0.1:1"}
    stack.policy_files = prepare.write_policies(stack.profile)
    stack.base_path = tmp_path / "seed"
    specs = {s.name: s for s in stack.specs()}
    public, private = tmp_path / "keys" / "gate.pub", tmp_path / "keys" / "gate.key"
    assert private.stat().st_mode & 0o777 == 0o600
    assert {s.env["FLYWHEEL_DECISIONS__PUBLIC_KEY"] for s in specs.values()} == {str(public)}
    assert [n for n, s in specs.items() if "FLYWHEEL_DECISIONS__SIGNING_KEY" in s.env] \
        == ["gate"]
    assert specs["gate"].env["FLYWHEEL_DECISIONS__SIGNING_KEY"] == str(private)
    # ... and a signing key in up's own environment reaches no other child.
    assert all("FLYWHEEL_DECISIONS__SIGNING_KEY" in s.hide for s in specs.values())
    made = Signer.load(private).key_id
    assert Verifier.load(public).key_ids == {made}
    assert Signer.load(Stack(Profile(home=tmp_path)).keys.signing_key).key_id == made  # once


def test_the_example_profile_for_real_runs_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(EXAMPLE.parents[2])  # its policy paths are relative to the checkout
    profile = load_profile(EXAMPLE)
    assert profile.model_path is not None and not profile.local_broker
    assert profile.generators == 4 and set(SERVICES) - {"scorer", "filter", "router"} <= {
        s for s in SERVICES if profile.section(s)}
    # Its passwords are never in the file: without them in the environment, it says which.
    with pytest.raises(ConfigError, match="FLYWHEEL_KAFKA__SASL_PASSWORD not set"):
        kafka_from_env(profile.kafka)
    monkeypatch.setenv("FLYWHEEL_KAFKA__SASL_PASSWORD", "admin-secret")
    kafka = kafka_from_env(profile.kafka)
    assert kafka.sasl_username == "flywheel" and "sasl_password" not in public(kafka)
    assert set(profile.credentials) == set(SERVICES)
    with pytest.raises(ConfigError, match="FW_GATE_PASSWORD is not set"):
        profile.credentials["gate"].password("gate")
    stack = Stack(profile)
    stack.kafka = public(kafka) | {"sasl_password": kafka.sasl_password}
    stack.policy_files = prepare.write_policies(stack.profile)
    # Every setting validates; then the task files are read, which live on the cluster.
    with pytest.raises(ConfigError, match=r"cannot read task file /data/math/train\.jsonl"):
        prepare.validate(stack.profile, stack.kafka, stack.policy_files)


def test_a_wrong_setting_is_named_before_anything_starts(tmp_path: Path) -> None:
    stack = Stack(Profile(home=tmp_path, trainer={"quotas": "lots"}))
    stack.kafka = {"bootstrap_servers": "127.0.0.1:1"}
    with pytest.raises(ConfigError, match="profile section 'trainer'"):
        prepare.validate(stack.profile, stack.kafka, stack.policy_files)
    bad = tmp_path / "p.yaml"
    bad.write_text("generators: 0\n")
    with pytest.raises(ConfigError, match="invalid profile"):
        load_profile(bad)


def test_a_time_budget_for_the_seed_model_is_refused_with_its_replacement(
        tmp_path: Path) -> None:
    profile = tmp_path / "old.yaml"
    profile.write_text("bootstrap: {seconds: 45}\n")  # its earlier name is still read
    with pytest.raises(ConfigError, match=r"seed_model\.samples"):
        load_profile(profile)


def test_the_seed_data_holds_no_task_of_the_held_out_suite(tmp_path: Path) -> None:
    """By id (the default suite draws from the same environment) and by prompt (a suite given
    as a task file has ids of another form: the bootstrap once excluded by id only)."""
    import json

    from services.envs.heldout import HeldOut, gate_guard, guard
    from services.seed_model import SeedModelSettings, seed_tasks

    held = gate_guard(Profile().gate)
    settings = SeedModelSettings(seed_examples=4000)
    one_digit = [t for t in seed_tasks(settings) if t.difficulty == 1]
    assert {t.task_id for t in one_digit} & held.ids  # 100 such sums: the raw draw holds some
    clean = seed_tasks(settings, held)
    assert len(clean) == 4000 and not {t.task_id for t in clean} & held.ids
    file = tmp_path / "held.jsonl"
    file.write_text("".join(json.dumps({"id": f"h{i}", "prompt": t.prompt, "answer": "0"}) + "\n"
                            for i, t in enumerate(one_digit[:5])), encoding="utf-8")
    by_file = guard([HeldOut(name="file", tasks_file=file)])
    prompts = {t.prompt for t in one_digit[:5]}
    assert not {t.task_id for t in seed_tasks(settings)} & by_file.ids
    assert not [t for t in seed_tasks(settings, by_file) if t.prompt in prompts]
