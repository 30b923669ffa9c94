"""Benchmark trainstate.save/load against torch.save/torch.load on a model + AdamW state (~1 GB by default)."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import xxhash
from memory import peak_rss
from peers import torch_checkpointing_manager

import trainstate

MAX_WIDTH = 2048
CHILD_TIMEOUT_S = 600

SAVE_OPS = ("trainstate.save", "torch.save+fsync", "torch.save")
LOAD_OPS = (
    "trainstate.load",
    "trainstate.load(verify=False)",
    "torch.load+load_state_dict",
    "torch.load(mmap)+load_state_dict",
    "safetensors+load_state_dict",
    "dcp.load",
    "torch_checkpointing.load",
)
# Where each load reads from: a source file written once per run by the matching writer below.
SOURCES = {
    "trainstate.load": "ts",
    "trainstate.load(verify=False)": "ts",
    "torch.load+load_state_dict": "torch",
    "torch.load(mmap)+load_state_dict": "torch",
    "safetensors+load_state_dict": "safetensors",
    "dcp.load": "dcp",
    "torch_checkpointing.load": "torch_checkpointing",
}
BASELINE = {"save": "torch.save+fsync", "load": "torch.load+load_state_dict"}
LABELS = {
    "trainstate.save": "trainstate.save (fsync + atomic rename)",
    "torch.save+fsync": "torch.save + os.fsync",
    "torch.save": "torch.save (no fsync)",
    "trainstate.load": "trainstate.load (verify=True)",
    "trainstate.load(verify=False)": "trainstate.load (verify=False)",
    "torch.load+load_state_dict": "torch.load(weights_only) + load_state_dict",
    "torch.load(mmap)+load_state_dict": "torch.load(weights_only, mmap=True) + load_state_dict",
    "safetensors+load_state_dict": "safetensors load_file + load_state_dict (hashes: none)",
    "dcp.load": "dcp.load + set_state_dict (hashes: none)",
    "torch_checkpointing.load": "torch_checkpointing load (mmap) + load_state_dict (hashes: none)",
}

Model = torch.nn.Sequential
Optimizer = torch.optim.AdamW


# --------------------------------------------------------------------------- state


def shape_for(params: int) -> tuple[int, int]:
    """(width, layers) of an MLP of square Linear layers with about ``params`` parameters."""
    width = max(8, min(MAX_WIDTH, math.isqrt(params // 4)))
    layers = max(1, round(params / (width * width + width)))
    return width, layers


def build_state(params: int, *, seed: int, trained: bool) -> tuple[Model, Optimizer]:
    """A float32 MLP and its AdamW; ``trained`` takes one step so exp_avg/exp_avg_sq exist."""
    torch.manual_seed(seed)
    width, layers = shape_for(params)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*blocks[:-1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if trained:
        model(torch.randn(8, width)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def tensors_of(model: Model, opt: Optimizer) -> list[torch.Tensor]:
    """Every tensor of the model and optimizer state, in a fixed order."""
    out = list(model.state_dict().values())
    for _, param_state in sorted(opt.state_dict()["state"].items()):
        out += [v for _, v in sorted(param_state.items()) if isinstance(v, torch.Tensor)]
    return out


def fingerprint(model: Model, opt: Optimizer) -> str:
    """Content hash of the whole state, to check that a load really restored it."""
    hasher = xxhash.xxh3_128()
    for t in tensors_of(model, opt):
        hasher.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return hasher.hexdigest()


# --------------------------------------------------------------------------- operations (run in a child)


def _ts_save(model: Model, opt: Optimizer, path: str) -> None:
    trainstate.save(path, {"model": model, "optimizer": opt})


def _torch_save_fsync(model: Model, opt: Optimizer, path: str) -> None:
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(model: Model, opt: Optimizer, path: str) -> None:
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)


def _ts_load(model: Model, opt: Optimizer, path: str) -> None:
    trainstate.load(path, {"model": model, "optimizer": opt})


def _ts_load_noverify(model: Model, opt: Optimizer, path: str) -> None:
    trainstate.load(path, {"model": model, "optimizer": opt}, verify=False)


def _torch_load(model: Model, opt: Optimizer, path: str) -> None:
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])


def _torch_load_mmap(model: Model, opt: Optimizer, path: str) -> None:
    saved = torch.load(path, weights_only=True, mmap=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])


def _flat(model: Model, opt: Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Model and optimizer as one flat tensor dict plus the optimizer's param groups as JSON (safetensors)."""
    osd = opt.state_dict()
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    flat |= {f"opt.{i}.{k}": v for i, s in osd["state"].items() for k, v in s.items()}
    return flat, json.dumps(osd["param_groups"])


def _safetensors_save(model: Model, opt: Optimizer, path: str) -> None:
    from safetensors.torch import save_file

    flat, groups = _flat(model, opt)
    save_file(flat, path, metadata={"param_groups": groups})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _safetensors_load(model: Model, opt: Optimizer, path: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    flat = load_file(path)
    model.load_state_dict({k[6:]: v for k, v in flat.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def _dcp_save(model: Model, opt: Optimizer, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)  # DCP's own state-dict API, as its load needs
    dcp.save({"model": model_sd, "optimizer": opt_sd}, checkpoint_id=path)


def _dcp_load(model: Model, opt: Optimizer, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, opt_sd = get_state_dict(model, opt)  # the optimizer's state allocated, as DCP needs targets
    state = {"model": model_sd, "optimizer": opt_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _tc_save(model: Model, opt: Optimizer, path: str) -> None:
    manager = torch_checkpointing_manager(sync=True)
    manager.save(path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    manager.close()


def _tc_load(model: Model, opt: Optimizer, path: str) -> None:
    manager = torch_checkpointing_manager(sync=True)
    loaded = manager.load(path, {"model": None, "optimizer": None})
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    manager.close()


WRITERS: dict[str, Callable[[Model, Optimizer, str], None]] = {
    "ts": _ts_save,
    "torch": _torch_save_fsync,
    "safetensors": _safetensors_save,
    "dcp": _dcp_save,
    "torch_checkpointing": _tc_save,
}


OPERATIONS: dict[str, Callable[[Model, Optimizer, str], None]] = {
    **{f"write:{name}": writer for name, writer in WRITERS.items()},
    "trainstate.save": _ts_save,
    "torch.save+fsync": _torch_save_fsync,
    "torch.save": _torch_save,
    "trainstate.load": _ts_load,
    "trainstate.load(verify=False)": _ts_load_noverify,
    "torch.load+load_state_dict": _torch_load,
    "torch.load(mmap)+load_state_dict": _torch_load_mmap,
    "safetensors+load_state_dict": _safetensors_load,
    "dcp.load": _dcp_load,
    "torch_checkpointing.load": _tc_load,
}


def child_measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the state, time one operation on it, and report seconds, peak extra RSS and a fingerprint."""
    is_load = spec["op"] in LOAD_OPS
    # A load starts from a fresh, differently initialised model and an optimizer without state.
    model, opt = build_state(spec["params"], seed=spec["seed"] + 1 if is_load else spec["seed"], trained=not is_load)
    operation = OPERATIONS[spec["op"]]
    with peak_rss() as rss:
        start = time.perf_counter()
        operation(model, opt, spec["path"])
        seconds = time.perf_counter() - start
    out = {"seconds": seconds, "peak_extra_mb": (rss.peak_kb - rss.baseline_kb) / 1024, "rss_method": rss.method}
    if spec.get("fingerprint") or is_load:
        out["fingerprint"] = fingerprint(model, opt)
    if spec.get("describe"):
        tensors = tensors_of(model, opt)
        out["state_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
        out["num_tensors"] = len(tensors)
        out["num_params"] = sum(p.numel() for p in model.parameters())
    return out


# --------------------------------------------------------------------------- parent


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter, then flush dirty pages so runs do not overlap."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
        check=False,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    os.sync()
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec['op']} failed (rc={proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def disk_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def evict(path: str) -> None:
    """Drop a (fsynced) file or directory from the page cache with POSIX_FADV_DONTNEED; no root needed."""
    files = [path] if os.path.isfile(path) else [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fs_type(path: str) -> str:
    """Filesystem type of the mount holding ``path`` (longest matching mount point in /proc/mounts)."""
    best, kind = "", "unknown"
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, fstype, *_ = line.split()
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def trainstate_source() -> str:
    """Where ``trainstate`` is imported from, with ``git describe --dirty`` when it is a checkout."""
    where = os.path.dirname(os.path.abspath(trainstate.__file__))
    try:
        git = subprocess.run(
            ["git", "-C", where, "describe", "--always", "--dirty"], check=True, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return where
    return f"{where} (git {git})"


@dataclass
class Result:
    op: str
    kind: str
    seconds: list[float]
    peak_extra_mb: list[float]
    median_s: float = 0.0
    gb_per_s: float = 0.0
    vs_torch: float = 0.0
    median_peak_extra_mb: float = 0.0


def prepare(root: str, params: int, seed: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Write the checkpoints that the load measurements read, one per format (a peer whose package is
    missing is left out, with a note)."""
    paths = {name: os.path.join(root, f"load-src-{name}") for name in WRITERS}
    info = run_child(
        {"op": "write:ts", "path": paths["ts"], "params": params, "seed": seed, "fingerprint": True, "describe": True}
    )
    for name in WRITERS:
        if name != "ts":
            try:
                run_child({"op": f"write:{name}", "path": paths[name], "params": params, "seed": seed})
            except RuntimeError as exc:
                print(f"{name}: not measured ({str(exc).strip().splitlines()[-1]})")
                del paths[name]
    info["disk_bytes"] = {name: disk_bytes(path) for name, path in paths.items()}
    return info, paths


def run_once(args: argparse.Namespace, op: str, path: str, expected: str) -> dict[str, Any]:
    """One measurement of ``op``: a save writes a new ``path`` and deletes it, a load reads ``path``."""
    if op in LOAD_OPS and args.cold:
        evict(path)
    out = run_child({"op": op, "path": path, "params": args.params, "seed": args.seed})
    if op in SAVE_OPS:
        remove(path)
    elif out["fingerprint"] != expected:
        raise RuntimeError(f"{op}: the loaded state differs from the saved one")
    return out


def measure(args: argparse.Namespace, root: str) -> tuple[dict[str, Any], list[Result]]:
    info, sources = prepare(root, args.params, args.seed)
    paths = {
        "trainstate.save": os.path.join(root, "save-ts"),
        "torch.save+fsync": os.path.join(root, "save.pt"),
        "torch.save": os.path.join(root, "save.pt"),
        **{op: sources[kind] for op, kind in SOURCES.items() if kind in sources},
    }
    loads = tuple(op for op in LOAD_OPS if op in paths)
    results = {op: Result(op, "save" if op in SAVE_OPS else "load", [], []) for op in (*SAVE_OPS, *loads)}
    rss_methods = set()
    for ops in (SAVE_OPS, loads):
        # Rounds interleave the operations so drift hits them alike; warm-up rounds are discarded.
        for i in range(args.warmup + args.repeat):
            for op in ops:
                out = run_once(args, op, paths[op], info["fingerprint"])
                if i >= args.warmup:
                    results[op].seconds.append(out["seconds"])
                    results[op].peak_extra_mb.append(out["peak_extra_mb"])
                    rss_methods.add(out["rss_method"])
    info["rss_method"] = ", ".join(sorted(rss_methods))
    summarize(list(results.values()), info["state_bytes"])
    return info, list(results.values())


def summarize(results: list[Result], state_bytes: int) -> None:
    for r in results:
        r.median_s = statistics.median(r.seconds)
        r.gb_per_s = state_bytes / 1e9 / r.median_s
        r.median_peak_extra_mb = statistics.median(r.peak_extra_mb)
    by_op = {r.op: r for r in results}
    for r in results:
        r.vs_torch = r.median_s / by_op[BASELINE[r.kind]].median_s


def render(args: argparse.Namespace, info: dict[str, Any], results: list[Result], root: str) -> str:
    width, layers = shape_for(args.params)
    gb = info["state_bytes"] / 1e9
    reads = (
        "cold in the guest page cache (evicted with posix_fadvise DONTNEED before each load; the host may still cache)"
        if args.cold
        else "warm (files were just written and sit in the page cache)"
    )
    lines = [
        (
            f"State: {info['num_params'] / 1e6:.1f}M params ({layers} x Linear({width}, {width}), float32) + AdamW "
            f"= {gb:.3f} GB in {info['num_tensors']} tensors; on disk: "
            + ", ".join(f"{name} {size / 1e9:.3f} GB" for name, size in info["disk_bytes"].items())
        ),
        (
            f"Directory: {root} ({fs_type(root)}); {os.cpu_count()} CPUs; torch {torch.__version__}, "
            f"trainstate {trainstate.__version__} from {trainstate_source()}; "
            f"median of {args.repeat} after {args.warmup} discarded warm-up round(s), each run in a fresh process"
        ),
        f"Reads: {reads}. Peak extra RSS: {info['rss_method']}, above the RSS once the live state is built.",
        "",
        "| operation | median s | min-max s | GB/s | time vs torch | peak extra RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {LABELS[r.op]} | {r.median_s:.3f} | {min(r.seconds):.3f}-{max(r.seconds):.3f} "
            f"| {r.gb_per_s:.2f} | {r.vs_torch:.2f}x | {r.median_peak_extra_mb:.0f} |"
        )
    by_op = {r.op: r for r in results}
    lines += ["", "Time ratios (lower is faster for trainstate):"]
    for op in ("trainstate.save", "trainstate.load", "trainstate.load(verify=False)"):
        base = BASELINE[by_op[op].kind]
        lines.append(f"  {op} / {base} = {by_op[op].vs_torch:.2f}x")
    for peer in (
        "torch.load(mmap)+load_state_dict",
        "dcp.load",
        "safetensors+load_state_dict",
        "torch_checkpointing.load",
    ):
        if peer in by_op:
            ratio = by_op["trainstate.load"].median_s / by_op[peer].median_s
            lines.append(f"  trainstate.load / {peer} = {ratio:.2f}x")
    lines.append(
        f"  trainstate.save / torch.save (no fsync) = "
        f"{by_op['trainstate.save'].median_s / by_op['torch.save'].median_s:.2f}x"
    )
    return "\n".join(lines)


def to_json(args: argparse.Namespace, info: dict[str, Any], results: list[Result], root: str) -> dict[str, Any]:
    return {
        "config": {
            "params_millions": args.params / 1e6,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "cold": args.cold,
            "seed": args.seed,
            "dir": root,
            "filesystem": fs_type(root),
        },
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "trainstate": trainstate.__version__,
            "trainstate_source": trainstate_source(),
            "platform": platform.platform(),
        },
        "state": {k: info[k] for k in ("num_params", "num_tensors", "state_bytes", "disk_bytes", "rss_method")},
        "results": [asdict(r) for r in results],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--params-millions", type=float, default=85.0, help="model size (AdamW triples it; default 85)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds before the measured ones (default 1)")
    p.add_argument("--dir", default=None, help="parent of the temporary working directory (default: /tmp)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON to OUT")
    p.add_argument("--cold", action="store_true", help="evict checkpoint files from the page cache before loads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.params = int(args.params_millions * 1e6)
    if args.repeat < 1 or args.params < 1 or args.warmup < 0:
        p.error("--repeat and --params-millions must be positive, --warmup not negative")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child_measure(json.loads(args.child))))
        return
    root = tempfile.mkdtemp(prefix="trainstate-bench-", dir=args.dir or "/tmp")
    try:
        info, results = measure(args, root)
        print(render(args, info, results, root))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(to_json(args, info, results, root), f, indent=2)
                f.write("\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
