"""`peft-fast` command line: `peft-fast bench` times peft_fast against HF PEFT and the bare base model;
`peft-fast finetune` runs a short LoRA fine-tune of a tiny Llama built from a config.

Neither needs downloads: models are built from configs with random weights; the fine-tune's data is a fixed
synthetic sequence task (each sequence counts up modulo the vocabulary), whose loss LoRA roughly halves in the
default 200 steps (4.9 → 2.7 on a CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _finetune(args: argparse.Namespace) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_fast as peft

    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).to(device)
    lora = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.print_trainable_parameters()

    def batch(n: int) -> torch.Tensor:
        start = torch.randint(0, config.vocab_size, (n, 1), device=device)
        return (start + torch.arange(args.seq_len, device=device)) % config.vocab_size

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = batch(args.batch_size)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s on {device}")
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    print(f"adapter saved to {os.path.abspath(args.out)}: {sorted(os.listdir(args.out))}")
    return 0


def _run_bench(args: argparse.Namespace):
    """Run the chosen suite (its cases `--only` names); the JSON payload, None for an unknown suite or an `--only`
    that names none of its cases."""
    import datetime
    import time

    import torch
    from tqdm import tqdm

    from .benchmark import environment, run_case, suites, to_json
    from .benchmark.runner import impl_names

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    available = suites(device, args.quick)
    if args.suite not in available:
        print(f"unknown suite {args.suite!r}; choose from {sorted(available)}", file=sys.stderr)
        return None
    cases = available[args.suite]
    if args.only:  # (e.g. one case of a long suite: --suite consumer --only 4x2048)
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        chosen = [c for c in cases if any(w in c.id for w in wanted)]
        if not chosen:
            ids = "\n  ".join(c.id for c in cases)
            print(f"--only {args.only!r} matches no case of suite {args.suite!r}; its cases:\n  {ids}", file=sys.stderr)
            return None
        cases = chosen
    repeats = 5 if args.quick and device.type == "cpu" else (50 if device.type == "cuda" else 20)
    results = []
    total = sum(len(impl_names(c, device)) for c in cases)
    start = time.perf_counter()
    with tqdm(total=total, desc="bench", unit="impl", file=sys.stderr, disable=args.no_progress) as bar:
        for case in cases:
            def on_impl(name, case=case):
                bar.set_postfix_str(f"{case.id} · {name}")
                bar.update(1)
                if args.no_progress:  # a log line instead (a run cut off by a time limit shows where it was)
                    print(f"bench +{time.perf_counter() - start:.0f} s: {case.id} · {name}", file=sys.stderr,
                          flush=True)

            results.append(run_case(case, device, dtype, repeats=repeats, on_impl=on_impl))
    payload = {
        "suite": args.suite,
        "quick": args.quick,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "environment": environment(device, dtype),
        "cases": to_json(results),
    }
    return payload


def _git_commit():
    """The peft_fast checkout's commit ("+dirty" with uncommitted changes to tracked files); None when peft_fast is
    not running from its own git checkout (an installed wheel inside some other repository)."""
    import subprocess

    package_dir = os.path.dirname(os.path.abspath(__file__))

    def git(*cmd):
        return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=5, cwd=package_dir)

    try:
        top = git("rev-parse", "--show-toplevel").stdout.strip()
        if not top or os.path.dirname(package_dir) != os.path.realpath(top):
            return None
        commit = git("rev-parse", "--short", "HEAD").stdout.strip() or None
        if commit and git("status", "--porcelain", "--untracked-files=no").stdout.strip():
            commit += "+dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return None


def _bench(args: argparse.Namespace) -> int:
    import json

    from .benchmark import report

    previous = None
    if args.compare_to:  # read it first: a bad file fails before minutes of benchmarking
        with open(args.compare_to) as f:
            previous = json.load(f)["cases"]
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:  # re-render an earlier run (e.g. one from a GPU machine) without running anything
        with open(args.from_json) as f:
            payload = json.load(f)
    else:
        payload = _run_bench(args)
        if payload is None:
            return 2
    json_path, png_path = os.path.join(args.out, "bench.json"), os.path.join(args.out, "bench.png")
    report.write_json(json_path, payload)
    env = payload["environment"]
    report.plot(png_path, payload["cases"], f"{env['device_name']} · {env['dtype']} · suite {payload['suite']}"
                f"{' (quick)' if payload.get('quick') else ''} · {payload.get('date', '')}")
    print(report.table(payload["cases"]))
    for line in report.throughput_lines(payload["cases"]):
        print(line)
    print(f"\nwrote {json_path} and {png_path}")
    status = 0
    wrong = [f"{c['id']} [{', '.join(n + (': ' + i['check_detail'] if i.get('check_detail') else '') for n, i in c['impls'].items() if i.get('ok') is False)}]"
             for c in payload["cases"] if any(i.get("ok") is False for i in c["impls"].values())]
    if wrong:
        print("WRONG RESULTS (not timed): " + "; ".join(wrong), file=sys.stderr)
        status = 1
    if previous is not None:
        text, regressed = report.compare(payload["cases"], previous, args.threshold)
        print(f"\ncompared with {args.compare_to}:\n{text}")
        if regressed:
            print(f"REGRESSION in {len(regressed)} case(s): {', '.join(regressed)}", file=sys.stderr)
            status = status or 3
    if args.write_results:
        path = report.write_results(args.results_dir, payload, png_path)
        print(f"wrote {path}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peft-fast", description=__doc__.split("\n\n")[0].replace("\n", " "))
    sub = parser.add_subparsers(dest="command")
    ft = sub.add_parser("finetune", help="short LoRA fine-tune of a tiny Llama built from a config (no downloads)")
    ft.add_argument("--steps", type=int, default=200)
    ft.add_argument("--batch-size", type=int, default=16)
    ft.add_argument("--seq-len", type=int, default=32)
    ft.add_argument("--r", type=int, default=8)
    ft.add_argument("--lr", type=float, default=3e-3)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ft.add_argument("--out", default="peft_fast_out/adapter", help="where the adapter is saved (default: %(default)s)")
    bench = sub.add_parser("bench", help="time peft_fast against HF PEFT and the bare base (table, JSON, plot)")
    bench.add_argument("--suite", default="all", help="all | layer | qlora | model | decode | consumer (the 7B QLoRA case: minutes) (default: all)")
    bench.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    bench.add_argument("--only", default=None, metavar="TEXT[,TEXT…]",
                       help="run only the suite's cases whose name contains one of these texts")
    bench.add_argument("--out", default="peft_fast_bench", help="directory for bench.json and bench.png (default: peft_fast_bench)")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                       help="default: bfloat16 on CUDA, float32 on CPU")
    bench.add_argument("--compare-to", default=None, metavar="FILE.json", help="an earlier bench.json to compare with")
    bench.add_argument("--threshold", type=float, default=0.10, help="with --compare-to: the slow-down that counts as a regression, as a fraction (default: 0.10 = 10%%)")
    bench.add_argument("--write-results", action="store_true", help="also regenerate bench/RESULTS.md")
    bench.add_argument("--results-dir", default="bench", help=argparse.SUPPRESS)
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--from-json", default=None, metavar="FILE.json",
                       help="re-render the table, plot (and --write-results) of an earlier run instead of running")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    if args.command in (None, "finetune"):
        if args.command is None:
            args = ft.parse_args([])
        return _finetune(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
