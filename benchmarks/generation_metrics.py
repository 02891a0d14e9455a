"""Generation metrics on reference "generators" whose answer is known, and what they cost.

    python benchmarks/generation_metrics.py --n 1000 --size 64

Three sets of pictures for the generation prompts of the ``test`` split:

- ``renders``: the ground-truth render of each prompt's watch (a perfect generator);
- ``vq_roundtrip``: those renders encoded and decoded by the shipped VQ tokenizer (the best a
  model that generates through it can do);
- ``other_prompts``: the renders scored against the prompt of another watch (a generator that
  draws good watches but ignores the prompt).

Each gets faithfulness (the reader against what the prompt states) and the reader's Fréchet
distance to 1,000 held-out renders, with wall times.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def run(n: int = 1000, size: int = 64, bootstrap: int = 100, n_real: int = 1000, threads: int = 1) -> list[dict]:
    from unified_vlm.datamodules.streams import WatchStream
    from unified_vlm.datamodules.watch import WatchAttributes, render_watch
    from unified_vlm.evaluation.generation import reader_frechet, reference_renders, score_generation
    from unified_vlm.evaluation.reader import load_reader, to_tensor_batch
    from unified_vlm.models.builders import build_vq_tokenizer

    torch.set_num_threads(threads)
    reader = load_reader()
    stream = WatchStream(split="test", num_watches=n, tasks=("generation",), image_size=size)
    records = [stream.record(i) for i in range(n)]
    renders = to_tensor_batch([render_watch(WatchAttributes.from_dict(r["attributes"]), size) for r in records])
    vq = build_vq_tokenizer("builtin").eval()
    with torch.no_grad():
        recon = torch.cat([vq.decode(vq.encode(renders[i: i + 200])) for i in range(0, n, 200)]).clamp(0, 1)
    if recon.shape[-1] != size:
        recon = torch.nn.functional.interpolate(recon, size=(size, size), mode="bilinear", antialias=True)
    real = reference_renders(n_real, size)
    rows = []
    for name, images, prompts in (("renders", renders, records), ("vq_roundtrip", recon, records),
                                  ("other_prompts", renders, records[1:] + records[:1])):
        start = time.perf_counter()
        faithfulness = score_generation(reader, images, prompts)
        faith_s = time.perf_counter() - start
        start = time.perf_counter()
        frechet = reader_frechet(reader, images, real=real, bootstrap=bootstrap)
        rows.append({"images": name, "n": n, "size": size, "faithfulness": faithfulness, "frechet": frechet,
                     "faithfulness_seconds": round(faith_s, 1), "frechet_seconds": round(time.perf_counter() - start, 1)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bootstrap", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    for row in run(a.n, a.size, a.bootstrap, threads=a.threads):
        f, d = row["faithfulness"], row["frechet"]
        print(json.dumps({"images": row["images"], **{k: round(f[k], 4) for k in ("time", "weather", "battery", "weather_pos",
                                                                                    "battery_pos", "total", "is_watch")},
                          "fd": round(d["fd"], 1), "fd_95": [round(d["low"], 1), round(d["high"], 1)],
                          "kid": round(d["kid"], 2), "faithfulness_s": row["faithfulness_seconds"],
                          "frechet_s": row["frechet_seconds"]}))


if __name__ == "__main__":
    main()
