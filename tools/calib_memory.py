#!/usr/bin/env python
"""Run the PTQ4DM pipeline from the API with NDTC N = 1024 on the DDPM CIFAR-10 architecture
(random weights: this measures memory and time, not quality) and report the observers' bytes.
Peak process memory: run it under `/usr/bin/time -v` (Maximum resident set size)."""

import argparse
import resource
import time

import torch

import ptq4dm


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    step = ptq4dm.DiffusionStep(ptq4dm.build_unet("ddpm-cifar10"),
                                ptq4dm.make_sampler("ddim", num_inference_steps=a.steps)).eval()
    t0 = time.perf_counter()
    r = ptq4dm.quantize(step, calibration=ptq4dm.NDTC(n=a.n, batch_size=a.batch))
    print(f"N = {r.report.calibration['n']}, {len(r.report.tensors)} tensors, "
          f"observer memory {r.report.calibration['observer_bytes'] / 2**20:.1f} MiB, "
          f"total error {r.report.total_error:.4g} vs min-max {r.report.total_error_minmax:.4g}, "
          f"{time.perf_counter() - t0:.0f} s; timings " + ", ".join(f"{k} {v:.0f}s" for k, v in r.report.timings.items()))
    print(f"peak RSS (getrusage) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
