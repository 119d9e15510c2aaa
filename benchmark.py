"""Measure training speed against this machine's limits and PyTorch, and where the time goes.

    python benchmark.py                 # the report's and the default's configurations
    python benchmark.py --profile       # and a per-operation breakdown of the steps
    python benchmark.py --epochs 3 --no-torch

Runs the real training epoch (train.train_epoch) on random CIFAR-shaped uint8 images, so no
data is needed, for two configurations side by side: the report's (512x512, batch 256, no
augmentation) and the default's (1024x1024, batch 128, flips and shifts). It prints seconds
per epoch, images per second, GFLOP/s achieved, their share of the float32 matrix-multiply
peak (the best of several runs in this process), the same for the network's matrix products
alone on the same shapes (the ceiling of that share: all else costing nothing) and peak
memory. With PyTorch installed it trains the same network, loss, optimiser and augmentation
in PyTorch, epoch for epoch in turn with ours, and prints the throughput ratio.

What makes the loop fast, for whoever works on it next: float32 end to end; no pass over the
training set beyond the SGD steps (the logged train loss is the mean of the batch losses);
batches gathered, augmented and normalised from uint8 one at a time into a reused buffer
(the float dataset is never built); the first layer skips the input gradient it does not
need; bias adds and activation gradients work in place; the optimiser updates in
cache-sized blocks; validation runs in batches of 2,000. Whitening (the default recipe)
also makes the first layer several times smaller. `--profile` shows what is left: the
matrix products take most of each step, the optimiser's memory-bound update most of the rest.
"""
import collections
import contextlib
import functools
import os
import platform
import resource
import time

import numpy as np
import threadpoolctl

import cli
import config as cfg
import data_loader
import kernels
import model
import optim
import train

CONFIGS = {
    "report": {"hidden_size": [512, 512], "batch_size": 256, "flip": False, "translate": 0,
               "reg": 1e-3},
    "default": {"hidden_size": [1024, 1024], "batch_size": 128, "flip": True, "translate": 2,
                "reg": 5e-4},
}
# No MixUp: the PyTorch twin trains on the batches as they are made.
COMMON = {"momentum": 0.9, "nesterov": True, "dropout": 0.0, "label_smoothing": 0.0, "mixup": 0.0}
OVERRIDABLE = ["hidden_size", "activation", "batch_size", "momentum", "nesterov", "reg",
               "dropout", "flip", "translate"]
# What --profile times: the layers, the loss, the data path and the optimiser.
PROFILED = {model: ["affine_forward", "affine_backward", "activation_forward",
                    "activation_backward", "dropout_forward", "dropout_backward",
                    "log_softmax", "cross_entropy", "cross_entropy_backward"],
            data_loader: ["make_batch"], optim.SGD: ["step"]}


def matmul_peak(n=2048, runs=7):
    """This machine's float32 matrix-multiply speed (GFLOP/s), the best of `runs` products."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    best = float("inf")
    for _ in range(runs + 1):  # the first warms up the threads
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def machine():
    """What the figures depend on: the CPU, the BLAS libraries and their threads, the kernels."""
    try:
        with open("/proc/cpuinfo") as f:
            info = {k.strip(): v for k, v in (line.split(":", 1) for line in f if ":" in line)}
        flags = info.get("flags", "").split()
        cpu = " ".join(info.get("model name", "?").split())
        cpu += " (AVX-512)" if "avx512f" in flags else " (AVX2)" if "avx2" in flags else ""
    except OSError:
        cpu = platform.processor() or platform.machine()
    lines = [f"CPU: {cpu}, {os.cpu_count()} logical cores"]
    blas = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    lines += [f"NumPy {np.__version__} BLAS: {i['internal_api']} {i.get('version')} "
              f"({i.get('architecture')} kernels), {i['num_threads']} threads" for i in blas]
    if kernels.enabled():
        import numba
        lines.append(f"fused kernels: Numba {numba.__version__}, on the calling thread")
    else:
        lines.append("fused kernels: off (NumPy references)")
    try:
        import torch
        lines.append(f"PyTorch {torch.__version__} BLAS: "
                     f"{'MKL' if torch.backends.mkl.is_available() else 'not MKL'}"
                     f"{' and oneDNN' if torch.backends.mkldnn.is_available() else ''}, "
                     f"{torch.get_num_threads()} threads")
    except ImportError:  # said with the results
        pass
    return lines


def peak_memory_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def numpy_epoch(config, images, labels):
    """A function that runs one epoch of this project's own loop."""
    prep = data_loader.Preprocessing(*data_loader.compute_stats(images[:5000]))
    net = model.ThreeLayerNN(data_loader.PIXELS, config["hidden_size"], data_loader.N_CLASSES,
                             config["activation"], dropout=config["dropout"])
    optimizer = optim.SGD(net.params, config["momentum"], config["nesterov"], config["reg"])
    rng = np.random.default_rng(0)
    return lambda: train.train_epoch(net, optimizer, images, labels, prep, config, 1, rng,
                                     False)


def no_torch_twin(config):
    """Why PyTorch cannot train the same network as `config`, or None if it can."""
    if config["activation"] != "relu" or config["dropout"]:
        return "its twin is the plain ReLU network without dropout, which these options change"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "PyTorch is not installed (it is optional: pip install torch)"
    return None


def torch_epoch(config, images, labels):
    """The same epoch in PyTorch on the CPU, from the same batches (data_loader.make_batch):
    only the network, the loss and the optimiser differ. None where `no_torch_twin` says why
    not."""
    if no_torch_twin(config):
        return None
    import torch
    torch.manual_seed(0)
    h1, h2 = config["hidden_size"]
    net = torch.nn.Sequential(torch.nn.Linear(data_loader.PIXELS, h1), torch.nn.ReLU(),
                              torch.nn.Linear(h1, h2), torch.nn.ReLU(),
                              torch.nn.Linear(h2, data_loader.N_CLASSES))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=config["momentum"],
                                nesterov=config["nesterov"], weight_decay=config["reg"])
    prep = data_loader.Preprocessing(*data_loader.compute_stats(images[:5000]))
    y_all, batch, rng = torch.from_numpy(labels), config["batch_size"], np.random.default_rng(0)
    buffer = np.empty((batch, data_loader.PIXELS), np.float32)

    def epoch():
        order = rng.permutation(len(images))
        for i in range(0, len(images) - batch + 1, batch):
            idx = order[i:i + batch]
            views = data_loader.draw_augmentation(batch, rng, config["flip"], config["translate"],
                                                  config["rotate"])
            x = data_loader.make_batch(images, idx, prep, np.float32, *views, out=buffer)
            loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return epoch


def products_epoch(config, n_images):
    """An epoch of the network's matrix products alone, on the same shapes: the time the loop
    would take if nothing else cost anything, so the ceiling of its share of the peak."""
    rng = np.random.default_rng(0)
    batch = config["batch_size"]
    sizes = [data_loader.PIXELS, *config["hidden_size"], data_loader.N_CLASSES]
    acts = [rng.standard_normal((batch, n), dtype=np.float32) for n in sizes]
    weights = [rng.standard_normal(shape, dtype=np.float32) for shape in zip(sizes, sizes[1:])]

    def epoch():
        for _ in range(n_images // batch):
            for i, w in enumerate(weights):
                acts[i] @ w  # forward
                acts[i].T @ acts[i + 1]  # weight gradient
                if i:  # input gradient; the first layer needs none
                    acts[i + 1] @ w.T
    return epoch


def seconds_of(epoch):
    start = time.perf_counter()
    epoch()
    return time.perf_counter() - start


@contextlib.contextmanager
def profiled():
    """Time every call of the PROFILED functions; yields the Counter of seconds by name."""
    seconds, originals = collections.Counter(), []
    for owner, names in PROFILED.items():
        for name in names:
            original = getattr(owner, name)
            originals.append((owner, name, original))

            @functools.wraps(original)
            def timed(*args, _original=original, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    seconds[_name] += time.perf_counter() - start
            setattr(owner, name, timed)
    try:
        yield seconds
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def measured_config(name, settings):
    """The training configuration measured as `name`, with the options given (`settings`)."""
    return cfg.make_config(**{**COMMON, **CONFIGS[name], **settings})


def shown_default(key):
    """What each configuration measures for `key` when it is not given, for --help."""
    values = {name: measured_config(name, {})[key] for name in CONFIGS}
    if len({str(v) for v in values.values()}) == 1:
        return str(values.popitem()[1])
    return ", ".join(f"{v} for {name}" for name, v in values.items())


def measure(name, settings, n_images, epochs, with_torch, peak):
    config = measured_config(name, settings)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_images, data_loader.PIXELS), dtype=np.uint8)
    labels = rng.integers(0, data_loader.N_CLASSES, size=n_images)
    ours = numpy_epoch(config, images, labels)
    theirs = torch_epoch(config, images, labels) if with_torch else None
    products = products_epoch(config, n_images)
    seconds, torch_seconds, product_seconds = [], [], []
    for _ in range(epochs + 1):  # in turn, so that a drift of the machine hits all alike
        seconds.append(seconds_of(ours))  # the first of each warms up caches and threads
        product_seconds.append(seconds_of(products))
        if theirs:
            torch_seconds.append(seconds_of(theirs))
    used = n_images // config["batch_size"] * config["batch_size"]
    net = model.ThreeLayerNN(data_loader.PIXELS, config["hidden_size"], data_loader.N_CLASSES)
    flops = net.flops(training=True) * used
    row = {"s/epoch": min(seconds[1:]), "images/s": used / min(seconds[1:])}
    row["GFLOP/s"] = flops / row["s/epoch"] / 1e9
    row["of peak"] = row["GFLOP/s"] / peak
    row["matmuls s/epoch"] = min(product_seconds[1:])
    row["matmuls of peak"] = flops / row["matmuls s/epoch"] / 1e9 / peak
    row["of matmuls"] = row["matmuls s/epoch"] / row["s/epoch"]  # the loop's share of its ceiling
    if torch_seconds:
        row["torch s/epoch"] = min(torch_seconds[1:])
        row["numpy/torch"] = row["torch s/epoch"] / row["s/epoch"]
    return config, row, ours


def print_profile(epoch):
    with profiled() as seconds:
        start = time.perf_counter()
        epoch()
        total = time.perf_counter() - start
    print(f"{'operation':<24} {'seconds':>8} {'share':>6}")
    for name, s in seconds.most_common():
        print(f"{name:<24} {s:8.3f} {s / total:6.1%}")
    rest = total - sum(seconds.values())
    print(f"{'(the loop itself)':<24} {rest:8.3f} {rest / total:6.1%}")


def main(argv):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2,
                        help="timed epochs of each loop (after a warm-up); the fastest counts")
    parser.add_argument("--n-images", type=int, default=45000,
                        help="training images per epoch (45,000 is CIFAR-10 less validation)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="which configurations to measure")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--profile", action="store_true",
                        help="also print where one epoch's time goes, operation by operation")
    cli.add_config_options(parser, {k: cfg.DEFAULT_CONFIG[k] for k in OVERRIDABLE}, {
        k: cfg.HELP[k] + " (overrides both configurations)" for k in OVERRIDABLE},
        {"activation": sorted(model.ACTIVATIONS)}, cfg.ALIASES,
        shown={k: shown_default(k) for k in OVERRIDABLE})
    args = parser.parse_args(argv)
    settings = cli.overrides(args, OVERRIDABLE)
    try:
        batch = [measured_config(name, settings)["batch_size"] for name in args.configs]
    except cli.Error as exc:
        parser.error(str(exc))
    if args.epochs < 1:
        parser.error(f"--epochs must be positive, got {args.epochs}")
    if args.n_images < max(batch):
        parser.error("--n-images must be at least --batch-size")

    print("\n".join(machine()))
    peak = matmul_peak()
    print(f"matmul peak: {peak:.0f} GFLOP/s (float32 2048x2048, best of 7 in this process)")
    rows, epochs, no_twin = {}, {}, set()
    for name in args.configs:
        config, rows[name], epochs[name] = measure(name, settings, args.n_images, args.epochs,
                                                   not args.no_torch, peak)
        no_twin.add(no_torch_twin(config))
        print(f"{name}: {config['hidden_size'][0]}x{config['hidden_size'][1]}, batch "
              f"{config['batch_size']}, augmentation "
              f"{'on' if config['flip'] or config['translate'] else 'off'}")
    keys = list(dict.fromkeys(k for row in rows.values() for k in row))
    print(f"{'':<16}" + "".join(f"{name:>12}" for name in rows))
    for key in keys:
        cells = []
        for row in rows.values():
            value = row.get(key)
            cells.append("-" if value is None else f"{value:.0%}" if "of " in key else
                         f"{value:.2f}x" if key == "numpy/torch" else f"{value:,.2f}")
        print(f"{key:<16}" + "".join(f"{c:>12}" for c in cells))
    print(f"peak memory: {peak_memory_mb():.0f} MB (this process)")
    if not args.no_torch:
        for why in sorted(no_twin - {None}):
            print(f"no PyTorch comparison: {why}")
    if args.profile:
        for name, epoch in epochs.items():
            print(f"\nwhere one epoch's time goes ({name}):")
            print_profile(epoch)
    return 0


if __name__ == "__main__":
    cli.run(main)
