"""Load test of the Serve app on loopback: concurrent clients posting /v1/compare then /v1/feedback.

Each client repeats compare (two summaries, stored as a pending comparison) and feedback (a choice,
committed before the answer) until it has sent ``--rounds`` pairs or ``--seconds`` have passed. Two
runs back to back on one local Ray: dynamic batching on (``--batch-size``) and off (1), each with a
fresh SQLite database, so the stored rows can be checked against the accepted requests.

Besides the whole run, each row has its steady state: compares answered per second between the
moment every client has had its first compare answered (ramp-up over) and the moment the first
client sends its last one (drain begins). A closed loop of few rounds is mostly ramp-up and drain,
which the whole-run figure mixes in.

    python benchmarks/serve_load.py --clients 16 --rounds 12 --seconds 120
    python benchmarks/serve_load.py --arch gpt2-125m --gpus-per-replica 1 --clients 1 8 32   # issue 7

By default the policy is the tiny test preset (tiny-t5, byte tokenizer, 24 new tokens), one replica
on one CPU: the numbers measure the serving path (HTTP, batching, generation, database), not a real
model. ``--arch`` publishes two random-weight versions of a real architecture's size instead
(``benchmarks/architectures.py``), and ``--gpus-per-replica 1`` serves them from a GPU in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny published policies the serving tests use

sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "benchmarks" / "gpu")]

from architectures import ARCHITECTURES, save_random  # noqa: E402
from gpu_common import device_report  # noqa: E402
from support.serve import publish_tiny, serve_config  # noqa: E402

from rlhf.serve.config import ServingConfig  # noqa: E402

ROUTES = ("/v1/compare", "/v1/feedback")
TEXT = ("The city council voted on Tuesday to extend the bike lane network across the river, "
        "after a year of debate about parking and safety near the schools. Client {client}, round {round}.")


def _post(session: requests.Session, url: str, route: str, body: dict, out: dict) -> dict | None:
    """One timed request; its JSON answer, or None (counted as an error) when it was not a 200."""
    start = time.perf_counter()
    try:
        answer = session.post(url + route, json=body, timeout=120)
    except requests.RequestException:
        answer = None
    out["latency_s"][route].append(time.perf_counter() - start)
    if answer is None or answer.status_code != 200:
        out["errors"] += 1
        return None
    return answer.json()


def _client(url: str, client: int, rounds: int, deadline: float, out: dict) -> None:
    session = requests.Session()
    for round_ in range(rounds):
        if time.monotonic() > deadline:
            return
        document = {"text": TEXT.format(client=client, round=round_)}
        out["compare_sent"].append(time.monotonic())
        compared = _post(session, url, "/v1/compare", document, out)
        if compared is None:
            continue
        out["compare_answered"].append(time.monotonic())
        out["accepted"]["compare"] += 1
        choice = {"comparison_id": compared["comparison_id"], "choice": round_ % 2}
        if _post(session, url, "/v1/feedback", choice, out) is not None:
            out["accepted"]["feedback"] += 1


def steady_state(clients: list[dict]) -> dict:
    """Compares answered per second while every client is in its loop: after each has had a first
    answer, before any sends its last compare (each client's ``compare_sent``/``compare_answered``
    are monotonic times)."""
    answered = [c["compare_answered"] for c in clients]
    if any(len(times) < 2 for times in answered):
        return {"window_s": 0.0, "compares": 0, "compares_per_s": None}
    start = max(times[0] for times in answered)
    end = min(c["compare_sent"][-1] for c in clients)
    inside = sum(start < t <= end for times in answered for t in times)
    window = end - start
    return {"window_s": round(window, 1), "compares": inside,
            "compares_per_s": round(inside / window, 3) if window > 0 and inside else None}


def _percentile_ms(sorted_values: list[float], q: float) -> float:
    return round(1000 * sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))], 1)


def publish_versions(registry: Path, arch: str) -> None:
    """Two policy versions (seeds 1 and 2): the tiny test preset, or random weights of ``arch``."""
    from rlhf.config.sections import ModelConfig
    from rlhf.models import load_policy
    from rlhf.registry import PolicyRegistry

    for seed in (1, 2):
        if arch == "tiny":
            publish_tiny(registry, seed)
            continue
        path, _ = save_random(arch, registry.parent / f"{arch}-{seed}", seed)
        policy = load_policy(ModelConfig(name_or_path=str(path), max_source_length=512, max_target_length=64))
        PolicyRegistry(registry).publish(policy.save, {"iteration": seed})


def run_load(url: str, max_batch_size: int, clients: int, rounds: int, seconds: float, workdir: Path,
             overrides: list[str]) -> dict:
    """Deploy the app with this batch size on a fresh database and drive it; one result row."""
    from ray import serve

    from rlhf.serve.app import build_app
    from rlhf.store import FeedbackStore

    cfg = serve_config(workdir / "registry", workdir / f"feedback-c{clients}-b{max_batch_size}.db",
                       f"serve.max_batch_size={max_batch_size}", *overrides)
    serve.run(build_app(cfg), name="load", route_prefix="/")
    requests.post(url + "/v1/summarize", json={"text": "warm up"}, timeout=120).raise_for_status()
    results = [{"latency_s": {route: [] for route in ROUTES}, "errors": 0,
                "accepted": {"compare": 0, "feedback": 0}, "compare_sent": [], "compare_answered": []}
               for _ in range(clients)]
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=_client, args=(url, i, rounds, deadline, results[i]))
               for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    sizes = serve.get_deployment_handle("PolicyDeployment", app_name="load").batch_sizes.remote().result()
    serve.delete("load")
    latencies = {route: sorted(x for r in results for x in r["latency_s"][route]) for route in ROUTES}
    requests_sent = sum(map(len, latencies.values()))
    compares = sum(r["accepted"]["compare"] for r in results)
    feedbacks = sum(r["accepted"]["feedback"] for r in results)
    store = FeedbackStore(cfg.store.url)
    stored = {"comparisons": store.count_comparisons(), "choices": store.count_decided()}
    store.close()
    return {
        "max_batch_size": max_batch_size,
        "clients": clients,
        "requests": requests_sent,
        "wall_s": round(wall, 2),
        "requests_per_s": round(requests_sent / wall, 2),
        "p50_ms": {route: _percentile_ms(values, 0.5) for route, values in latencies.items()},
        "p99_ms": {route: _percentile_ms(values, 0.99) for route, values in latencies.items()},
        "p50_ms_all": _percentile_ms(sorted(x for values in latencies.values() for x in values), 0.5),
        "steady_state": steady_state(results),
        "errors": sum(r["errors"] for r in results),
        # the warm-up request included; sizes as strings (JSON keys)
        "batch_sizes": {"requests": dict(sorted(sizes.requests.items())),
                        "rows_per_call": dict(sorted(sizes.rows.items())),
                        "mean_rows_per_call": round(sizes.mean_rows(), 2)},
        "accepted": {"compare": compares, "feedback": feedbacks},
        "stored": stored,
        "stored_equals_accepted": stored == {"comparisons": compares, "choices": feedbacks},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[16], help="one pair of runs per count")
    parser.add_argument("--rounds", type=int, default=12, help="compare+feedback pairs per client (bound)")
    parser.add_argument("--seconds", type=float, default=120, help="time bound per run")
    parser.add_argument("--batch-size", type=int, default=16, help="max_batch_size of the batched run")
    parser.add_argument("--no-baseline", action="store_true",
                        help="only the batched run (compare with an earlier run's max_batch_size 1 row)")
    parser.add_argument("--arch", default="tiny", choices=("tiny", *ARCHITECTURES))
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--batch-wait-s", type=float, default=ServingConfig.batch_wait_timeout_s,
                        help="serve.batch_wait_timeout_s of both runs")
    parser.add_argument("--threads-per-replica", type=int, default=ServingConfig.threads_per_replica,
                        help="serve.threads_per_replica of both runs (0: one per reserved CPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    args = parser.parse_args()
    for name in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED"):
        os.environ.setdefault(name, "disabled" if name == "RAY_AUTH_MODE" else "0")

    import ray
    from ray import serve

    workdir = Path(tempfile.mkdtemp(prefix="rlhf-load-"))
    publish_versions(workdir / "registry", args.arch)
    ray.init(address="local", num_cpus=2, num_gpus=None if args.gpus_per_replica else 0,
             include_dashboard=False, log_to_driver=False)
    port = serve_config(workdir / "registry", workdir / "unused.db").serve.port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    overrides = [f"serve.gpus_per_replica={args.gpus_per_replica}", f"serve.max_new_tokens={args.new_tokens}",
                 f"serve.batch_wait_timeout_s={args.batch_wait_s}",
                 f"serve.threads_per_replica={args.threads_per_replica}"]
    rows, ratios = [], []
    for clients in args.clients:
        on = run_load(url, args.batch_size, clients, args.rounds, args.seconds, workdir, overrides)
        rows.append(on)
        if args.no_baseline:
            continue
        off = run_load(url, 1, clients, args.rounds, args.seconds, workdir, overrides)
        rows.append(off)
        steady = on["steady_state"]["compares_per_s"], off["steady_state"]["compares_per_s"]
        ratios.append({
            "clients": clients,
            "batching_speedup_requests_per_s": round(on["requests_per_s"] / off["requests_per_s"], 2),
            "batching_speedup_steady_compares_per_s": (round(steady[0] / steady[1], 2) if all(steady)
                                                       else None),
            "batching_compare_p50_ratio": round(on["p50_ms"]["/v1/compare"]
                                                / off["p50_ms"]["/v1/compare"], 2),
        })
    serve.shutdown()
    ray.shutdown()
    report = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "arch": args.arch, "gpus_per_replica": args.gpus_per_replica, "new_tokens": args.new_tokens,
        "batch_wait_s": args.batch_wait_s, "threads_per_replica": args.threads_per_replica,
        **device_report(),
        "runs": rows,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| clients | max_batch_size | requests | req/s | steady compares/s (window s) | compare p50/p99 ms "
          "| feedback p50/p99 ms | rows per generate call (mean) | errors | stored = accepted |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        p50, p99, steady = row["p50_ms"], row["p99_ms"], row["steady_state"]
        print(f"| {row['clients']} | {row['max_batch_size']} | {row['requests']} | {row['requests_per_s']} | "
              f"{steady['compares_per_s']} ({steady['window_s']}) | "
              + " | ".join(f"{p50[route]} / {p99[route]}" for route in ROUTES)
              + f" | {row['batch_sizes']['mean_rows_per_call']} | {row['errors']} "
              + f"| {row['stored_equals_accepted']} |")
    for ratio in ratios:
        print(f"{ratio['clients']} clients, batching on/off: {ratio['batching_speedup_requests_per_s']}x "
              f"requests/s, {ratio['batching_speedup_steady_compares_per_s']}x steady compares/s, "
              f"compare p50 ratio {ratio['batching_compare_p50_ratio']}")


if __name__ == "__main__":
    main()
