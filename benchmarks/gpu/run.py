"""The GPU validation kit: one command that proves WeightLoRA on one NVIDIA GPU and records what it measured.

    bash benchmarks/gpu/run.sh OUT_DIR              # on the GPU machine: installs .whl/ if carried, then this
    python benchmarks/gpu/run.py OUT_DIR            # the same, with the packages already installed
    python benchmarks/gpu/run.py OUT_DIR --dry-run  # on a CPU: tiny shapes, the same code paths where CUDA is not needed

Steps, each in its own process with its own time limit (a failing step is recorded and the others still run):
  tests   pytest -m gpu tests/gpu: bf16 + fused AdamW, fp16 GradScaler overflow, 8-bit and 4-bit NF4 bases,
          gradient checkpointing, one-process NCCL torchrun (the DDP re-wrap), the Trainer under accelerate's FSDP2
          and under DeepSpeed ZeRO-3 (one process each; ZeRO-3 where DeepSpeed is installed), WeightLoraSFTTrainer,
          memory freed at the switch, omega on another device than its adapters, CUDA generator untouched,
          half-precision omega gradients; each through warm-up, switch, save and a stock PEFT reload where it applies
  memory  benchmarks/gpu/memory.py: CUDA memory per phase of Trainer runs, LoRA vs WeightLoRA vs WeightLoRA+
  speed   benchmarks/speed.py in bf16 on Llama-3-8B shapes (r=16, all 7 projections of 32 layers, 4 x 512 tokens)
          and on SmolLM2-135M shapes (r=8, 2 x 128 tokens: where Python overhead shows)
  fsdp2   benchmarks/fsdp2_cost.py, one process under `fully_shard` on SmolLM2-135M shapes: WeightLoRA after its
          mask-mode switch against LoRA on the kept modules (its JSON is folded into the kit's: 8 files come back)

Writes into OUT_DIR: gpu_kit_<device>.json (everything, with the machine, versions, command and date),
gpu_kit_<device>.md (the README table), the memory and speed JSONs, pytest_gpu.xml. Needs nothing from the
network; models are built from configs with random weights. Exit status 0 only if every test and check passed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"]

# The dry run measures the memory of the two variants its check compares: on a CPU each is a child process (~10 s of
# imports), a path the CUDA run never takes (it reads max_memory_allocated in-process for every variant).
DRY_RUN_MEMORY = ["--memory_variants", "lora", "switched"]
SPEED_RUNS = {  # name: (speed.py flags on CUDA, flags in the dry run or None to skip it there)
    "llama3-8b-shapes": (
        ["--model", "llama3-8b-shapes", "--r", "16", "--batch", "4", "--seq", "512", "--rounds", "20"],
        ["--model", "tiny", "--r", "16", "--batch", "2", "--seq", "16", "--rounds", "2", *DRY_RUN_MEMORY],
    ),
    "smollm2-135m-shapes": (
        ["--model", "smollm2-135m-shapes", "--r", "8", "--batch", "2", "--seq", "128", "--rounds", "40"],
        None,  # the dry run's tiny shapes would run the llama3-8b entry's code again (25 s of CI for nothing new)
    ),
}
FSDP2_RUN = (  # benchmarks/fsdp2_cost.py flags on CUDA (one process, NCCL) and in the dry run (gloo)
    ["--model", "smollm2-135m-shapes", "--lora_r", "8", "--batch", "2", "--seq", "128", "--rounds", "30"],
    ["--model", "tiny", "--lora_r", "8", "--batch", "1", "--seq", "16", "--rounds", "2"],
)
# Seconds per step: well above what each took on an H100/H200. The tests step took 164 s on an H200 (2026-12-04) with
# the FSDP2 Trainer test stopped at 90 s of its 140 s, so about 215 s whole; the ZeRO-3 one, skipped there (no
# DeepSpeed), would add three launches: 360 s.
STEP_LIMITS = {"tests": 360, "memory": 90, "speed:llama3-8b-shapes": 180, "speed:smollm2-135m-shapes": 180, "fsdp2": 60}
# Per test, where pytest-timeout is installed: one hung test must not take the whole step's report. The FSDP2 Trainer
# test launches three processes and took 140 s on an H200 (90 s stopped it in its first resume).
TEST_LIMIT = 240


def device_slug(dry_run: bool) -> str:
    if dry_run:
        return "cpu-dry-run"
    import torch

    name = torch.cuda.get_device_name().lower()
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.removeprefix("nvidia ")).strip("-")  # e.g. cuda-h100-80gb-hbm3


def environment(dry_run: bool) -> dict:
    import torch

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    cuda = torch.cuda.is_available() and not dry_run
    # The GPU machine gets the working tree but may get an older .git, so `commit` can predate what ran; the
    # fingerprint of the code that ran is what identifies it (`source_sha256` computes the same anywhere).
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit or None,
        "source_sha256": source_sha256(),
        "dry_run": dry_run,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "gpu": {
            "name": torch.cuda.get_device_name(),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
            "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
        if cuda
        else None,
        "versions": versions,
    }


def source_sha256() -> str:
    """sha256 over the code the kit exercises (the package, the benchmarks, the GPU tests), path and bytes."""
    digest = hashlib.sha256()
    files = [
        *REPO.glob("wlora_trl/**/*.py"),
        *REPO.glob("benchmarks/**/*.py"),
        *REPO.glob("tests/gpu/*.py"),
        REPO / "tests" / "conftest.py",
        REPO / "tests" / "testing_utils.py",
    ]
    for path in sorted(files):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def run_step(name: str, command: list[str], log: Path, env: dict | None = None) -> dict:
    """Run one step as a child process under its time limit, its output teed to the log."""
    print(f"\n=== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n=== {name}: {' '.join(command)}\n")
        out.flush()
        try:
            process = subprocess.run(
                command,
                cwd=REPO,
                env={**os.environ, **(env or {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=STEP_LIMITS[name],
            )
            output, returncode = process.stdout, process.returncode
        except subprocess.TimeoutExpired as error:
            output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
            output += f"\n[timed out after {STEP_LIMITS[name]} s]\n"
            returncode = None
        out.write(output)
    print(output[-4000:], flush=True)
    return {"returncode": returncode, "seconds": round(time.perf_counter() - start, 1)}


def read_junit(path: Path) -> list[dict]:
    if not path.exists():
        return []
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (element.get("message") or "")[:500]
        tests.append(
            {"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message}
        )
    return tests


def speed_summary(path: Path) -> dict | None:
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return {
        "file": path.name,
        "settings": result["settings"],
        "median_step_seconds": result["median_step_seconds"],
        "ratios": result["ratios"],
        "switch_seconds": result["switch_seconds"],
        "peak_memory_bytes": result["peak_memory_bytes"],
        "trainable_parameters": result["trainable_parameters"],
        "checks": result["checks"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--dry-run", action="store_true", help="on a CPU: tiny shapes, CUDA-only tests skipped")
    parser.add_argument(
        "--steps", default="tests,memory,speed,fsdp2", help="comma-separated subset of tests,memory,speed,fsdp2"
    )
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run to check the kit on a CPU")
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    slug = device_slug(args.dry_run)
    steps = set(args.steps.split(","))
    log = out / "steps.log"
    log.write_text("")
    dtype = "float32" if args.dry_run else "bfloat16"
    dtype_flags = ["--device", "cpu" if args.dry_run else "cuda", "--dtype", dtype]
    summary = {**environment(args.dry_run), "device_slug": slug, "steps": {}}

    if "tests" in steps:
        junit = out / "pytest_gpu.xml"
        env = {"WLORA_GPU_KIT_DRY_RUN": "1"} if args.dry_run else {}
        timeout = [f"--timeout={TEST_LIMIT}"] if importlib.util.find_spec("pytest_timeout") else []
        summary["steps"]["tests"] = run_step(
            "tests",
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-rfE",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                "-W",
                "ignore",
                *timeout,
                f"--junitxml={junit}",
                "tests/gpu",
            ],
            log,
            env,
        )
        summary["tests"] = read_junit(junit)

    if "memory" in steps:
        memory_json = out / f"memory_{slug}.json"
        flags = ["--dry-run"] if args.dry_run else []
        summary["steps"]["memory"] = run_step(
            "memory", [sys.executable, "benchmarks/gpu/memory.py", "--output", str(memory_json), *flags], log
        )
        summary["memory"] = json.loads(memory_json.read_text()) if memory_json.exists() else None

    if "speed" in steps:
        summary["speed"] = {}
        for name, (gpu_flags, dry_flags) in SPEED_RUNS.items():
            if args.dry_run and dry_flags is None:
                continue
            speed_json = out / f"speed_{name}_{slug}_{dtype}.json"
            flags = dry_flags if args.dry_run else gpu_flags
            summary["steps"][f"speed:{name}"] = run_step(
                f"speed:{name}",
                [sys.executable, "benchmarks/speed.py", *flags, *dtype_flags, "--output", str(speed_json)],
                log,
            )
            summary["speed"][name] = speed_summary(speed_json)

    if "fsdp2" in steps:
        with tempfile.TemporaryDirectory() as tmp:
            fsdp2_json = Path(tmp) / "fsdp2_cost.json"
            flags = FSDP2_RUN[1] if args.dry_run else [*FSDP2_RUN[0], "--dtype", dtype]
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
            summary["steps"]["fsdp2"] = run_step(
                "fsdp2", [*launcher, "benchmarks/fsdp2_cost.py", *flags, "--output", str(fsdp2_json)], log
            )
            summary["fsdp2"] = json.loads(fsdp2_json.read_text()) if fsdp2_json.exists() else None

    summary["checks"] = collect_checks(summary)
    (out / f"gpu_kit_{slug}.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = render_table(summary)
    (out / f"gpu_kit_{slug}.md").write_text(table)
    print("\n" + table)
    failed = [name for name, ok in summary["checks"].items() if not ok]
    print(f"wrote {out}/gpu_kit_{slug}.json; " + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed"))
    return 1 if failed else 0


def collect_checks(summary: dict) -> dict[str, bool]:
    """Every pass/fail of the run in one flat dict: steps that ran to completion, tests, benchmark targets."""
    checks = {}
    for name, step in summary["steps"].items():
        checks[f"step {name} finished"] = step["returncode"] is not None
    for test in summary.get("tests") or []:
        if test["outcome"] != "skipped":
            checks[f"test {test['name']}"] = test["outcome"] == "passed"
    if "tests" in summary["steps"]:
        checks["tests ran"] = any(t["outcome"] == "passed" for t in summary.get("tests") or [])
    if summary.get("memory"):
        checks.update({f"memory: {k}": v for k, v in summary["memory"]["checks"].items()})
    if "fsdp2" in summary["steps"]:
        checks["fsdp2 wrote its results"] = summary.get("fsdp2") is not None
    for name, speed in (summary.get("speed") or {}).items():
        if speed is None:
            checks[f"speed {name} wrote its results"] = False
            continue
        if not summary["dry_run"]:  # tiny CPU shapes measure nothing about a GPU
            checks.update({f"speed {name}: {k}": v for k, v in speed["checks"].items()})
    return checks


def render_table(summary: dict) -> str:
    """The README's GPU section tables, from the kit's JSON (so they are never copied by hand)."""
    gpu = summary["gpu"] or {"name": "CPU (dry run)", "memory_gib": None, "cuda": None}
    v = summary["versions"]
    lines = [
        f"Measured on {gpu['name']} ({gpu['memory_gib']} GiB), CUDA {gpu['cuda']}, torch {v['torch']}, "
        f"transformers {v['transformers']}, peft {v['peft']}, trl {v['trl']}, bitsandbytes {v['bitsandbytes']}, "
        f"{summary['date'][:10]}, code fingerprint {summary['source_sha256'][:12]} (`source_sha256`).",
        "",
    ]
    tests = summary.get("tests") or []
    if tests:
        counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "error", "skipped")}
        lines += [
            f"Tests (`pytest -m gpu tests/gpu`): {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['error']} errors, {counts['skipped']} skipped.",
            "",
            "| test | outcome | seconds |",
            "|---|---|---:|",
        ]
        lines += [f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} |" for t in tests]
        lines.append("")
    speeds = {k: s for k, s in (summary.get("speed") or {}).items() if s}
    if speeds:
        lines += [
            "| shapes | adapters | r | tokens/step | LoRA step (ms) | warm-up / LoRA | warm-up with v0.1 hooks / LoRA "
            "| switched / LoRA same modules | WeightLoRA+ / LoRA | switch (ms) | peak MiB LoRA / switched |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in speeds.items():
            st, r, m, mem = s["settings"], s["ratios"], s["median_step_seconds"], s["peak_memory_bytes"]
            lines.append(
                f"| {name} | {st['adapters']} | {st['r']} | {st['batch']} x {st['seq']} | {m['lora'] * 1000:.1f} "
                f"| {r['warmup']:.3f} | {r['warmup_hooks']:.3f} | {r['switched']:.3f} | {r['plus_switched']:.3f} "
                f"| {s['switch_seconds']['switched'] * 1000:.0f} | {mem['lora'] / 2**20:.0f} / {mem['switched'] / 2**20:.0f} |"
            )
        lines += [
            "",
            "Targets: warm-up / LoRA <= 1.05, switched / LoRA on the same modules <= 1.02, WeightLoRA+ / LoRA "
            "<= 1.05, switch < 1 s, peak memory after the switch < LoRA's.",
            "",
        ]
        masked = {
            name: s["ratios"]["masked_switched"] for name, s in speeds.items() if "masked_switched" in s["ratios"]
        }
        if masked:
            ratios = ", ".join(f"{name} {ratio:.3f}" for name, ratio in masked.items())
            lines += [f"Mask mode (FSDP2's switch, here unsharded) after the switch / module swap: {ratios}.", ""]
    fsdp2 = summary.get("fsdp2")
    if fsdp2:
        st, r = fsdp2["settings"], fsdp2["ratios_to_lora_same"]
        lines += [
            f"FSDP2 (`fully_shard`, {fsdp2['machine']['world_size']} process, {st['model']}, r = {st['lora_r']}, "
            f"{st['batch']} x {st['seq']} tokens): WeightLoRA after its mask-mode switch / LoRA on the kept modules "
            f"{r['masked']:.3f}; LoRA on all modules / on the kept ones {r['lora']:.3f} "
            f"(LoRA on the kept modules: {fsdp2['median_step_seconds']['lora_same'] * 1000:.1f} ms a step).",
            "",
        ]
    memory = summary.get("memory")
    if memory and memory["methods"]["lora"]["warmup"]["peak"] is not None:
        st = memory["settings"]
        lines += [
            f"CUDA memory per phase, Trainer runs on {st['model']} (r = {st['r']}, {st['batch']} x {st['seq']} "
            f"tokens, {st['dtype']}, T = {st['T']} of {st['max_steps']} steps), MiB:",
            "",
            "| method | warm-up peak | after-switch peak | held after warm-up | held at the end | trainable after |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for method, r in memory["methods"].items():
            w, a = r["warmup"], r["after_switch"]
            lines.append(
                f"| {method} | {w['peak'] / 2**20:.1f} | {a['peak'] / 2**20:.1f} | "
                f"{w['allocated_at_end'] / 2**20:.1f} | {a['allocated_at_end'] / 2**20:.1f} | "
                f"{a['trainable']:,} |"
            )
        lines.append("")
    failed = [name for name, ok in summary["checks"].items() if not ok]
    lines.append(
        f"Checks: {len(summary['checks']) - len(failed)} of {len(summary['checks'])} passed"
        + (f"; failed: {', '.join(failed)}." if failed else ".")
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
