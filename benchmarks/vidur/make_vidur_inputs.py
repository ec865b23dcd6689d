"""Prepare inputs for Vidur 0.0.26 (PyPI) without network access.

1. Trace: first N rows of an Azure LLM 2023 trace (TIMESTAMP,ContextTokens,GeneratedTokens)
   -> Vidur trace_replay CSV (Date,Time,PromptTokenCount,CompletionTokenCount),
   Time = seconds since first row, prefill+decode clamped to --max-tokens (prefill is cut).
2. Profiles: Vidur 0.0.26 fetches profiles with huggingface_hub.snapshot_download.
   We build an offline HF cache (refs/main + snapshots/<rev>/) under <cache_dir>/profiling_data/
   holding the real mlp.csv (compressed to mlp.csv.xz) and a SYNTHETIC attention.csv.xz
   (roofline, see attention_rows). With TP=1, PP=1 Vidur never reads all_reduce/send_recv,
   so the network dataset contains only its config.json.
"""
import argparse
import json
import os
import shutil

import numpy as np
import pandas as pd

# H100-SXM roofline constants (dense BF16 peak, HBM3 bandwidth), Llama-2-7B at TP=1
PEAK_FLOPS = 989e12
HBM_BW = 3.35e12
OVERHEAD_MS = 0.005          # fixed per-kernel launch cost
N_EMBD, N_Q_HEAD, N_KV_HEAD, HEAD_DIM, BLOCK = 4096, 32, 32, 128, 16
FAKE_REV = "0" * 40


def roofline_ms(flops, nbytes):
    return OVERHEAD_MS + 1e3 * np.maximum(flops / PEAK_FLOPS, nbytes / HBM_BW)


def attention_rows():
    """One attention layer on one GPU, bf16 (2 bytes/elt).
    prefill chunk c after k cached tokens: flops = 4*Hq*d*c*(k + c/2)  (QK^T + PV, causal)
                                           bytes = 2*(2*Hkv*d*(k+c) + 2*Hq*d*c)  (read K,V; read Q, write O)
    decode, b requests with k cached tokens: flops = 4*Hq*d*b*k, bytes = 2*(2*Hkv*d*b*k + 2*Hq*d*b)
    kv_cache_save of n tokens: bytes = 2*2*Hkv*d*n (write K,V)
    time_ms = 0.005 + 1e3*max(flops/989e12, bytes/3.35e12)"""
    rows = []
    kvs = list(range(0, 4097, 256))
    for c in [32, 64, 128, 256, 512, 1024, 2048, 4096]:
        for k in kvs:
            if k + c > 4096:
                continue
            f = 4 * N_Q_HEAD * HEAD_DIM * c * (k + c / 2)
            b = 2 * (2 * N_KV_HEAD * HEAD_DIM * (k + c) + 2 * N_Q_HEAD * HEAD_DIM * c)
            rows.append(dict(batch_size=1, prefill_chunk_size=c, kv_cache_size=k,
                             **{"time_stats.attn_prefill.median": roofline_ms(f, b),
                                "time_stats.attn_decode.median": np.nan,
                                "time_stats.attn_kv_cache_save.median":
                                    roofline_ms(0, 4 * N_KV_HEAD * HEAD_DIM * c)}))
    for bs in [1, 2, 4, 8, 16, 32, 64, 128]:
        for k in kvs:
            f = 4 * N_Q_HEAD * HEAD_DIM * bs * k
            b = 2 * (2 * N_KV_HEAD * HEAD_DIM * bs * k + 2 * N_Q_HEAD * HEAD_DIM * bs)
            rows.append(dict(batch_size=bs, prefill_chunk_size=0, kv_cache_size=k,
                             **{"time_stats.attn_prefill.median": np.nan,
                                "time_stats.attn_decode.median": roofline_ms(f, b),
                                "time_stats.attn_kv_cache_save.median":
                                    roofline_ms(0, 4 * N_KV_HEAD * HEAD_DIM * bs)}))
    df = pd.DataFrame(rows)
    df["n_embd"], df["n_q_head"], df["n_kv_head"] = N_EMBD, N_Q_HEAD, N_KV_HEAD
    df["block_size"], df["num_tensor_parallel_workers"] = BLOCK, 1
    return df


def fake_hf_dataset(cache_root, repo_id, files, config):
    storage = os.path.join(cache_root, "datasets--" + repo_id.replace("/", "--"))
    snap = os.path.join(storage, "snapshots", FAKE_REV)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    with open(os.path.join(storage, "refs", "main"), "w") as f:
        f.write(FAKE_REV)
    with open(os.path.join(snap, "config.json"), "w") as f:
        json.dump(config, f)
    for name, df in files.items():
        df.to_csv(os.path.join(snap, name), index=False, compression="xz")
    return snap


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trace", required=True)
    p.add_argument("--num-requests", type=int, default=10000)
    p.add_argument("--out-trace", required=True)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--date", default="2023-08-21")
    p.add_argument("--profiles", required=True, help="dir holding compute/<gpu>/meta-llama/...")
    p.add_argument("--device", default="h100")
    p.add_argument("--model", default="meta-llama/Llama-2-7b-hf")
    p.add_argument("--cache-dir", required=True, help="Vidur predictor cache_dir")
    p.add_argument("--compute-repo", default="local/vidur-llama-2-7b-h100")
    p.add_argument("--network-repo", default="local/vidur-h100-dgx")
    p.add_argument("--network-device", default="h100_dgx")
    a = p.parse_args()

    t = pd.read_csv(a.trace, nrows=a.num_requests)
    ts = pd.to_datetime(t["TIMESTAMP"])
    decode = t["GeneratedTokens"].clip(lower=1, upper=a.max_tokens - 1).astype(int)
    prefill = np.minimum(t["ContextTokens"].clip(lower=1), a.max_tokens - decode).astype(int)
    out = pd.DataFrame({"Date": a.date, "Time": (ts - ts.iloc[0]).dt.total_seconds(),
                        "PromptTokenCount": prefill, "CompletionTokenCount": decode})
    out.to_csv(a.out_trace, index=False)
    print(f"trace: {len(out)} requests over {out.Time.iloc[-1]:.1f}s -> {a.out_trace}")

    mlp = pd.read_csv(os.path.join(a.profiles, "compute", a.device, a.model, "mlp.csv"))
    if os.path.isdir(os.path.join(a.cache_dir, "profiling_data")):
        shutil.rmtree(os.path.join(a.cache_dir, "profiling_data"))
    s1 = fake_hf_dataset(os.path.join(a.cache_dir, "profiling_data", "compute"), a.compute_repo,
                         {"mlp.csv.xz": mlp, "attention.csv.xz": attention_rows()},
                         {"model": a.model, "device_sku": a.device})
    s2 = fake_hf_dataset(os.path.join(a.cache_dir, "profiling_data", "network"), a.network_repo,
                         {}, {"sku": a.network_device})
    print(f"profiles: {s1}\n          {s2}")


if __name__ == "__main__":
    main()
