"""Measure training speed and memory against this machine's limits (and PyTorch, if present).

    python benchmark.py                          # the report's configuration: 512x512, batch 256
    python benchmark.py --hidden-size 1024 --batch-size 128 --epochs 3

Runs the real training epoch (train.train_epoch) on random CIFAR-shaped uint8 images, so
no data is needed. Prints seconds per epoch, images per second, achieved GFLOP/s, the
fraction of the float32 matrix-multiply speed measured in the same run, and peak memory.
When PyTorch is installed it trains the same network in the same run and prints the ratio.
"""
import resource
import time

import numpy as np

import cli
import config as cfg
import data_loader
import model
import optim
import train

BENCH_DEFAULTS = {"hidden_size": [512, 512], "batch_size": 256, "epochs": 2, "n_images": 45000,
                  "activation": "relu", "momentum": 0.9, "reg": 1e-3, "flip": False,
                  "translate": 0, "dropout": 0.0, "seed": 0}
BENCH_HELP = {"n_images": "training images per epoch (45,000 is CIFAR-10 less validation)",
              "epochs": "timed epochs (after one warm-up epoch); the fastest is reported",
              **cfg.HELP}
INPUT, CLASSES = data_loader.PIXELS, data_loader.N_CLASSES


def flops_per_image(h1, h2, d=INPUT, c=CLASSES):
    """Forward (2 per multiply-add) plus backward (twice that, less the unneeded input grad)."""
    macs = d * h1 + h1 * h2 + h2 * c
    return 2 * macs + 4 * macs - 2 * d * h1


def matmul_gflops(n=2048, repeats=10):
    """This machine's float32 matrix-multiply speed, on square matrices."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def peak_memory_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def numpy_epoch_seconds(config, images, labels):
    """Seconds per training epoch of this project's own loop, the fastest of the timed epochs."""
    mean, std = data_loader.compute_stats(images[:5000])
    net = model.ThreeLayerNN(INPUT, config["hidden_size"], CLASSES, config["activation"],
                             dtype=np.float32, dropout=config["dropout"])
    optimizer = optim.SGD(net.params, config["momentum"], config["nesterov"], config["reg"])
    rng = np.random.default_rng(0)
    times = []
    for epoch in range(config["epochs"] + 1):  # the first epoch warms up caches and threads
        start = time.perf_counter()
        train.train_epoch(net, optimizer, images, labels, mean, std, config, 1, rng, False)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def torch_epoch_seconds(config, images, labels):
    """The same network, loss and optimiser in PyTorch on the CPU; None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    h1, h2 = config["hidden_size"]
    net = torch.nn.Sequential(torch.nn.Linear(INPUT, h1), torch.nn.ReLU(), torch.nn.Linear(h1, h2),
                              torch.nn.ReLU(), torch.nn.Linear(h2, CLASSES))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=config["momentum"],
                                nesterov=config["nesterov"], weight_decay=config["reg"])
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    mean = x_all[:5000].float().mean(0)
    std = x_all[:5000].float().std(0)
    batch = config["batch_size"]
    times = []
    for epoch in range(config["epochs"] + 1):
        start = time.perf_counter()
        order = torch.randperm(len(images))
        for i in range(0, len(images) - batch + 1, batch):
            idx = order[i:i + batch]
            x = (x_all[idx].float() - mean) / std
            loss = torch.nn.functional.cross_entropy(net(x), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main(argv):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    cli.add_config_options(parser, {**BENCH_DEFAULTS}, BENCH_HELP,
                           {"activation": sorted(model.ACTIVATIONS)})
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    args = parser.parse_args(argv)
    settings = {**BENCH_DEFAULTS, **cli.overrides(args, BENCH_DEFAULTS)}
    n_images = settings.pop("n_images")
    try:
        config = cfg.make_config(**settings)
    except cli.Error as exc:
        parser.error(str(exc))
    if n_images < config["batch_size"]:
        parser.error("--n-images must be at least --batch-size")

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_images, INPUT), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, size=n_images)
    h1, h2 = config["hidden_size"]
    peak = matmul_gflops()
    seconds = numpy_epoch_seconds(config, images, labels)
    used = n_images // config["batch_size"] * config["batch_size"]
    gflops = flops_per_image(h1, h2) * used / seconds / 1e9
    print(f"configuration     : {h1}x{h2} {config['activation']}, batch {config['batch_size']}, "
          f"{n_images} images, float32, momentum {config['momentum']}, augmentation "
          f"{'on' if config['flip'] or config['translate'] else 'off'}")
    print(f"matmul peak       : {peak:.0f} GFLOP/s (float32, 2048x2048, this run)")
    print(f"numpy epoch       : {seconds:.2f} s  ({used / seconds:,.0f} images/s)")
    print(f"achieved          : {gflops:.0f} GFLOP/s = {gflops / peak:.0%} of the matmul peak "
          f"({flops_per_image(h1, h2) / 1e6:.2f} MFLOP per image)")
    print(f"peak memory       : {peak_memory_mb():.0f} MB (this process, {n_images} uint8 images "
          f"and the network, before PyTorch is loaded)")
    if not args.no_torch:
        torch_seconds = torch_epoch_seconds(config, images, labels)
        if torch_seconds is None:
            print("pytorch epoch     : PyTorch is not installed (optional: pip install torch)")
        else:
            import torch
            print(f"pytorch epoch     : {torch_seconds:.2f} s  ({used / torch_seconds:,.0f} images/s, "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads)")
            print(f"numpy / pytorch   : {torch_seconds / seconds:.2f}x the throughput")
    return 0


if __name__ == "__main__":
    cli.run(main)
