"""Benchmarks that prove the trials run at the machine's limit: `python -m bench NAME [--quick]`.

  trial-overhead  the same training as a bare loop and as one Ray Tune trial (ratio of times)
  compute-limit   achieved training FLOP/s against torch.mm's, and our layers against torch's
  asha-vs-grid    the MLP dropout grid under FIFO and under ASHA: epochs spent, winner kept
  gpu-packing     CNN trials sharing one GPU, and each CUDA option on and off (needs CUDA)

Every comparison runs both sides in the same run, interleaved, and reports ratios;
bench/results/<name>.json keeps the last full run, <name>.quick.json the last quick one.
docs/performance.md holds the tables and the conclusions.
"""
