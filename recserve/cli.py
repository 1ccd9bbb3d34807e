"""The ``recserve`` command: one entry point, one subcommand per job.

``main(argv)`` parses arguments, sets up logging and dispatches; library code below it takes
typed values. Every recserve error ends the command with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from recserve.contracts.errors import ConfigError, RecserveError

log = logging.getLogger("recserve")
PROFILES = ("drm1", "drm2", "drm3", "dlrmv2")  # recserve.model.synth.PROFILES (a test checks)


def _names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError("feature names must be a comma-separated list")
    return names


def _size(value: str) -> int:
    from recserve.contracts.units import parse_size

    try:
        return parse_size(value)
    except RecserveError as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


def plugin_commands() -> dict[str, Any]:
    """Subcommands other packages register (the daemons): name -> entry point."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="recserve.commands")}


PLUGIN_HELP = {
    "shardd": "serve one shard's table parts over ZeroMQ",
    "gateway": "serve the model over HTTP",
    "loadgen": "drive load at a gateway",
}


def build_parser(plugins: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recserve", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in plugins:
        sub.add_parser(name, help=f"{PLUGIN_HELP.get(name, name)} (recserve {name} --help)")

    imp = sub.add_parser("import", help="turn a trained checkpoint into a model artifact")
    isub = imp.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name, helptext in (
        ("dlrm", "facebookresearch/dlrm DLRM_Net state_dict"),
        ("torchrec", "torchrec.models.dlrm.DLRM state_dict"),
    ):
        p = isub.add_parser(name, help=helptext)
        p.add_argument("--checkpoint", required=True, type=Path)
        if name == "dlrm":
            p.add_argument(
                "--interaction",
                choices=("dot", "cat"),
                help="default: inferred from the top MLP's input width",
            )
            p.add_argument(
                "--interaction-itself",
                action="store_true",
                default=None,
                help="dot interaction includes self-interaction (the diagonal)",
            )
    p = isub.add_parser("npz", help="plain numpy weights plus an architecture JSON")
    p.add_argument("--weights", required=True, type=Path)
    p.add_argument("--arch", required=True, type=Path)
    for p in isub.choices.values():
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--overwrite", action="store_true")
        if p.prog.split()[-1] != "npz":
            p.add_argument(
                "--feature-names",
                type=_names,
                help="comma-separated, one per table (default: 0,1,2,...)",
            )
            p.add_argument("--name", help="model name (default: the checkpoint's file name)")
            p.add_argument("--model-version", default="1")

    p = sub.add_parser("predict", help="score a JSON file of samples in-process")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output", type=Path, help="default: stdout")

    p = sub.add_parser("synth", help="write a synthetic DRM-like model (drm1, drm2, drm3)")
    p.add_argument("--profile", required=True, choices=PROFILES)
    p.add_argument("--size", required=True, type=_size, help="table bytes, e.g. 1GiB")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("quantize", help="convert a model's tables to fp16 or int8 row-wise")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--dtype", required=True, choices=("fp16", "int8"))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--samples", type=int, default=1024, help="samples for the error report")

    p = sub.add_parser("demo", help="a local cluster vs singular under load, end to end")
    p.add_argument("--workdir", type=Path, default=Path(".demo"))
    p.add_argument("--profile", choices=PROFILES, default="drm2", help="the synthetic model")
    p.add_argument("--size", type=_size, default="1GiB")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per run")

    p = sub.add_parser("plan", help="assign tables (or row ranges) to shards: plan.json")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--shards", required=True, type=int)
    p.add_argument("--strategy", default="auto", choices=("capacity", "load", "net", "auto"))
    p.add_argument("--shard-memory", type=_size, help="bytes of tables one shard may hold")
    p.add_argument(
        "--cache-bytes",
        type=_size,
        help="the shards serve from a row cache of this size (shardd --cache-bytes): parts "
        "may exceed --shard-memory; the report gives each shard's expected hit rate",
    )
    p.add_argument("--replicas", type=int, default=1, help="endpoints (processes) per shard")
    p.add_argument("--hosts", type=Path, help="TOML file of endpoints per shard and replica")
    p.add_argument("--base-port", type=int, default=5600, help="first local port (no --hosts)")
    p.add_argument("--access-stats", type=Path, help="measured per-table pooling factors")
    p.add_argument("--samples", type=int, default=256, help="samples per request (load model)")
    p.add_argument(
        "--context-nets",
        default="",
        help="nets looked up once per request (ranking form), comma-separated, e.g. user",
    )
    p.add_argument("--compare", action="store_true", help="print every strategy side by side")
    p.add_argument("--out", required=True, type=Path)

    p = sub.add_parser("up", help="run a local cluster: shard daemons + gateway")
    p.add_argument("--model", required=True, type=Path)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--plan", type=Path, help="use this plan (default: plan now)")
    where.add_argument("--singular", action="store_true", help="gateway only, no shards")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--replicas", type=int, default=1, help="shard daemons per shard")
    p.add_argument("--strategy", default="net", choices=("capacity", "load", "net", "auto"))
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--curve-keys", type=Path, help="CURVE between gateway and shards (keygen)")
    p.add_argument(
        "--cache-bytes",
        type=_size,
        help="each shard serves from a row cache of this size over the table files "
        "(shardd --cache-bytes) instead of preloading its parts",
    )
    p.add_argument(
        "--admin-token-file", type=Path, help="take online updates (recserve push) with this token"
    )
    p.add_argument(
        "--admin-port",
        type=int,
        help="take updates on this port, in a gateway worker of their own (gateway --admin-port)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes (gateway --workers; with updates, needs --admin-port)",
    )
    p.add_argument(
        "--pin-shards",
        action="store_true",
        help="run each shard daemon on one CPU of its own, round robin (shardd --cpus)",
    )
    p.add_argument(
        "--pin-workers",
        action="store_true",
        help="run each gateway worker on CPUs of its own (gateway --pin-workers)",
    )

    p = sub.add_parser(
        "study", help="Lui et al.'s strategy study over simulated hosts with a network between"
    )
    p.add_argument("--profiles", default="drm1,drm2,drm3", help="comma-separated profiles")
    p.add_argument("--strategies", default="capacity,load,net", help="comma-separated")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--size", default="256MiB", help="each profile's model size")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--qps", type=float, default=10.0, help="open-loop requests per second")
    load.add_argument(
        "--sweep", action="store_true", help="per run, the highest rate whose P99 holds --slo-ms"
    )
    p.add_argument("--slo-ms", type=float, default=50.0, help="the P99 objective of --sweep")
    p.add_argument("--samples", type=int, default=16, help="samples per request")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per run (step)")
    p.add_argument("--hosts", choices=("netns", "local"), default="netns")
    p.add_argument("--net-delay-us", type=float, default=50.0, help="one-way delay between hosts")
    p.add_argument("--net-jitter-us", type=float, default=10.0)
    p.add_argument("--net-rate", type=float, default=10.0, help="link rate, Gbit/s")
    p.add_argument(
        "--delays", default="", help="a sweep of one-way delays (us) for the first profile"
    )
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", required=True, type=Path)

    p = sub.add_parser("push", help="send an online update (rows, dense arrays) to a gateway")
    p.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8080")
    p.add_argument(
        "--updates", required=True, type=Path, help=".npz of <table>.ids/.rows, dense.<array>"
    )
    p.add_argument("--token-file", type=Path, help="the gateway's --admin-token-file token")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")

    p = sub.add_parser(
        "deploy", help="switch a running cluster to a new artifact, with no failed request"
    )
    p.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8080")
    p.add_argument(
        "--model", required=True, type=Path,
        help="the new artifact (same tables and layers), at this path on every host",
    )  # fmt: skip
    p.add_argument("--token-file", type=Path, help="the gateway's --admin-token-file token")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait")

    p = sub.add_parser("keygen", help="write CURVE key pairs for shards and gateways")
    p.add_argument("--out", required=True, type=Path)

    p = sub.add_parser("verify", help="check every file of an artifact against its checksums")
    p.add_argument("--model", required=True, type=Path)

    p = sub.add_parser("info", help="print an artifact's manifest summary")
    p.add_argument("--model", required=True, type=Path)
    return parser


def cmd_import(args: argparse.Namespace) -> int:
    from recserve.model import importers

    if args.source == "npz":
        manifest = importers.import_npz(args.weights, args.arch, args.out, overwrite=args.overwrite)
    else:
        common = dict(
            feature_names=args.feature_names,
            name=args.name,
            version=args.model_version,
            overwrite=args.overwrite,
        )
        if args.source == "dlrm":
            manifest = importers.import_dlrm(
                args.checkpoint,
                args.out,
                interaction=args.interaction,
                interaction_itself=args.interaction_itself,
                **common,
            )
        else:
            manifest = importers.import_torchrec(args.checkpoint, args.out, **common)
    inter = manifest.dense.interaction
    how = (
        f"dcn ({inter.layers} cross layers, rank {inter.rank})"
        if inter.kind == "dcn"
        else f"{inter.kind}/{inter.order}{' +self' if inter.self_interaction else ''}"
    )
    print(
        f"imported {manifest.name}: {len(manifest.tables)} tables, "
        f"{manifest.table_bytes / 2**20:.1f} MiB, interaction {how} -> {args.out}"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from recserve.local.offline import predict, read_samples, scores_document
    from recserve.model.scorer import Model

    model = Model.open(args.model)
    scores = predict(model, read_samples(args.input))
    body = orjson.dumps(scores_document(model, scores))
    if args.output:
        args.output.write_bytes(body + b"\n")
    else:
        sys.stdout.buffer.write(body + b"\n")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from recserve.contracts.units import format_size
    from recserve.model.synth import synthesize

    m = synthesize(args.profile, args.size, args.out, seed=args.seed, overwrite=args.overwrite)
    nets = sorted({t.net for t in m.tables})
    print(
        f"wrote {m.name} ({len(m.tables)} tables, {format_size(m.table_bytes)}, nets "
        f"{', '.join(nets)}, dim {m.embedding_dim}) -> {args.out}"
    )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from recserve.model.quantize import quantize_model

    _, report = quantize_model(
        args.model, args.dtype, args.out, overwrite=args.overwrite, samples=args.samples
    )
    print(f"quantized {args.model} to {args.dtype} -> {args.out}")
    for line in report.lines():
        print(f"  {line}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from recserve.local.demo import run_demo

    return run_demo(args.workdir, args.size, args.duration, profile=args.profile)


def cmd_plan(args: argparse.Namespace) -> int:
    from recserve.contracts.manifest import read_manifest
    from recserve.contracts.plan import Plan, local_endpoints, read_hosts
    from recserve.planning import STRATEGIES, Traffic, build, compare_table, read_access_stats

    manifest = read_manifest(args.model)
    if args.replicas < 1 or args.samples < 1:
        raise ConfigError("--replicas and --samples must be at least 1")
    endpoints = (
        read_hosts(args.hosts, args.shards, args.replicas)
        if args.hosts
        else local_endpoints(args.shards, args.replicas, base_port=args.base_port)
    )
    traffic = Traffic(args.samples, frozenset(n for n in args.context_nets.split(",") if n))
    access = read_access_stats(args.access_stats) if args.access_stats else None

    def make(strategy: str) -> Plan:
        return build(
            manifest,
            args.shards,
            strategy,
            endpoints,
            shard_memory=args.shard_memory,
            traffic=traffic,
            access=access,
            cache_bytes=args.cache_bytes,
        )

    plan = make(args.strategy)
    if args.compare:
        plans = {s: make(s) for s in STRATEGIES}
        print("\n".join(compare_table(plans)))
    args.out.write_bytes(plan.to_json() + b"\n")
    r = plan.report
    print(
        f"wrote {args.out}: {plan.strategy} over {args.shards} shards x {args.replicas} "
        f"replicas; bytes max/mean {r['bytes_imbalance']:.2f}, load max/mean "
        f"{r['load_imbalance']:.2f}, {len(r['split_tables'])} tables split by rows"
    )
    if "chosen_because" in r:
        print(f"auto chose {plan.strategy}: {r['chosen_because']}")
    if "expected_hit_rate" in r:
        rates = ", ".join(f"{x:.3f}" for x in r["expected_hit_rate"])
        print(f"expected cache hit rate per shard (Zipf model, an upper bound): {rates}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from recserve.local.cluster import run_up

    return run_up(
        args.model,
        plan=args.plan,
        shards=args.shards,
        strategy=args.strategy,
        port=args.port,
        singular=args.singular,
        curve_keys=args.curve_keys,
        replicas=args.replicas,
        cache_bytes=args.cache_bytes,
        admin_token_file=args.admin_token_file,
        admin_port=args.admin_port,
        workers=args.workers,
        pin_shards=args.pin_shards,
        pin_workers=args.pin_workers,
    )


def cmd_study(args: argparse.Namespace) -> int:
    from recserve.local import netlab, study

    profiles = [p for p in args.profiles.split(",") if p]
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = [p for p in profiles if p not in PROFILES] + [
        s for s in strategies if s not in ("capacity", "load", "net")
    ]
    if unknown or not profiles or args.shards < 1 or args.qps <= 0 or args.duration <= 0:
        raise ConfigError(f"bad study settings: {', '.join(unknown) or 'counts must be > 0'}")
    try:
        delays = [float(d) for d in args.delays.split(",") if d]
    except ValueError:
        raise ConfigError(f"--delays must be numbers: {args.delays!r}") from None
    link = netlab.Link(args.net_delay_us, args.net_jitter_us, args.net_rate)
    setup = study.Setup(
        args.hosts, args.shards, args.qps, args.samples, args.duration, link, args.sweep,
        args.slo_ms,
    )  # fmt: skip
    study.install_signal_cleanup()
    study.run_study(profiles, strategies, setup, args.size, args.out, delays, args.plot)
    return 0


def _admin_post(
    name: str, url: str, body: bytes, ctype: str, token_file: Path | None, timeout: float
) -> dict[str, Any] | None:
    """POST to a gateway's admin endpoint with the token; the JSON reply, or None after
    printing the error."""
    import json
    import urllib.error
    import urllib.request

    try:
        token = token_file.read_text().strip() if token_file else None
    except OSError as exc:
        raise ConfigError(f"{exc.filename}: {exc.strerror}") from None
    headers = {"Content-Type": ctype, "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc
    except urllib.error.HTTPError as exc:
        with exc:
            try:
                err = json.loads(exc.read())["error"]
                what = f"{err.get('field', '')}: {err['message']}".lstrip(": ")
            except Exception:
                what = f"HTTP {exc.code}"
        print(f"recserve {name}: error: {what} (HTTP {exc.code})", file=sys.stderr)
    except (urllib.error.URLError, TimeoutError) as exc:
        print(f"recserve {name}: error: {url}: {exc}", file=sys.stderr)
    return None


def cmd_push(args: argparse.Namespace) -> int:
    try:
        body = args.updates.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{exc.filename}: {exc.strerror}") from None
    url = args.url.rstrip("/") + "/v1/updates"
    doc = _admin_post("push", url, body, "application/x-npz", args.token_file, args.timeout)
    if doc is None:
        return 2
    dense = f" and dense {', '.join(doc['dense'])}" if doc.get("dense") else ""
    print(
        f"committed version {doc['version']}: {doc['rows']} rows{dense} (stage "
        f"{doc['stage_ms']:.1f} ms, commit {doc['commit_ms']:.1f} ms)"
    )
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    import json

    from recserve.contracts.manifest import read_manifest

    model = args.model.resolve()
    read_manifest(model)  # a clear error here rather than from every shard
    url = args.url.rstrip("/") + "/v1/deploy"
    body = json.dumps({"model": str(model)}).encode()
    doc = _admin_post("deploy", url, body, "application/json", args.token_file, args.timeout)
    if doc is None:
        return 2
    m = doc["model"]
    print(
        f"serving {m['name']} {m['version']} ({m['digest'][:12]}) from version "
        f"{doc['version']} (load {doc['load_ms'] / 1e3:.1f} s, commit {doc['commit_ms']:.1f} ms)"
    )
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from recserve.rpc.curve import keygen

    for path in keygen(args.out):
        print(f"wrote {path}")
    print(
        "shards need server.key_secret and client.key; gateways client.key_secret and "
        "server.key (pass the directory as --curve-keys)"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from recserve.contracts.manifest import read_manifest
    from recserve.model.artifact import verify

    manifest = read_manifest(args.model)
    verify(args.model, manifest)
    print(f"ok: {len(manifest.files)} files match their checksums ({manifest.digest()[:12]})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from recserve.contracts.manifest import read_manifest

    m = read_manifest(args.model)
    print(f"{m.name} version {m.version}  digest {m.digest()[:12]}  dense width {m.dense_width}")
    print(f"{'table':<20} {'rows':>12} {'dim':>4} {'dtype':>5} {'net':>8} {'MiB':>10}  features")
    for t in m.tables:
        print(
            f"{t.name:<20} {t.rows:>12} {t.dim:>4} {t.dtype:>5} {t.net:>8} "
            f"{t.nbytes / 2**20:>10.1f}  {','.join(t.features)}"
        )
    print(f"total {m.table_bytes / 2**20:.1f} MiB in {len(m.tables)} tables")
    return 0


COMMANDS = {
    "import": cmd_import,
    "predict": cmd_predict,
    "synth": cmd_synth,
    "quantize": cmd_quantize,
    "demo": cmd_demo,
    "plan": cmd_plan,
    "up": cmd_up,
    "keygen": cmd_keygen,
    "push": cmd_push,
    "deploy": cmd_deploy,
    "study": cmd_study,
    "verify": cmd_verify,
    "info": cmd_info,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plugins = plugin_commands()
    if argv and argv[0] in plugins:
        code: int = plugins[argv[0]].load()(argv[1:])
        return code
    args = build_parser(sorted(plugins)).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except RecserveError as exc:
        print(f"recserve {args.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
