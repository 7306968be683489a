"""Command line: ``vi-toolkit COMMAND`` (also ``python -m vi_toolkit``)."""

import argparse
import os
import sys

import numpy as np
import torch

from .diagnostics import psis_khat
from .evaluation import evaluate
from .result import load_fit
from .specs import load_object


def _demo(args):
    from .demo import run_demo

    run_demo(args.out, seed=args.seed, device=args.device, quick=args.quick)


def _json(text):
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object of keyword arguments")
    return value


def _load_model_and_guide(args):
    """(model, guide, exact) named by --model and --guide, built with their JSON kwargs.

    A model class whose instance has a ``model`` method is a classic model
    (``vi_toolkit.models.gmm:GaussianMixture``, ``vi_toolkit.models.hmm:HiddenMarkovModel``, ``vi_toolkit.models.ppca:PPCA``):
    the Pyro model is that method, the guide class gets the instance as its first argument
    (``vi_toolkit.guides.gmm:MAPGuide`` becomes ``MAPGuide(mixture, **guide_kwargs)``), and ``exact`` is
    the instance if it has an exact ``log_likelihood``; otherwise ``exact`` is None.
    """
    model = load_object(args.model, args.model_kwargs, name="--model")
    if not callable(getattr(model, "model", None)):
        return model, load_object(args.guide, args.guide_kwargs, name="--guide"), None
    guide = load_object(args.guide, args.guide_kwargs, name="--guide", args=(model,))
    return model.model, guide, model if hasattr(model, "log_likelihood") else None


def _evaluate(args):
    import os

    sys.path.insert(0, os.getcwd())  # models/ and guides/ of the current checkout
    model, guide, exact = _load_model_and_guide(args)
    if args.data is not None:
        data = load_data_file(args.data)
    else:
        from .datasets import load_images

        images = load_images(args.dataset, root=args.data_root, binarize=args.binarize,
                             seed=args.data_seed, device="cpu")
        data = getattr(images, args.split)
    if args.num_points is not None:
        if args.num_points < 1:
            raise ValueError(f"--num-points must be positive, got {args.num_points}")
        data = ({k: v[:args.num_points] for k, v in data.items()} if isinstance(data, dict)
                else tuple(v[:args.num_points] for v in data) if isinstance(data, (tuple, list))
                else data[:args.num_points])
    report = evaluate_checkpoint(args.checkpoint, model, guide, data, num_samples=args.num_samples,
                                 khat_samples=args.khat_samples, batch_size=args.batch_size,
                                 chunk_size=args.chunk_size, exact=exact, device=args.device,
                                 seed=args.seed)
    print(f"{args.checkpoint}: {report['num_data']} data points")
    print(f"  held-out ELBO / point          {report['elbo']:.6g} +- {report['elbo_se']:.2g}")
    print(f"  IWAE log-likelihood / point    {report['iwae']:.6g} +- {report['iwae_se']:.2g} "
          f"(K = {report['num_samples']})")
    if "exact" in report:
        print(f"  exact log-likelihood / point   {report['exact']:.6g} +- {report['exact_se']:.2g} "
              f"(the model's log_likelihood at the point estimate)")
        print(f"  exact - IWAE                   {report['exact_minus_iwae']:.3g}")
    label = "PSIS k-hat (mean over points)" if report["pointwise"] else "PSIS k-hat (joint)"
    line = f"  {label:<31}{report['khat']:.3f} ({report['reading']})"
    if report["pointwise"]:
        line += (f"; max {report['khat_max']:.3f}, {100 * report['fraction_unreliable']:.1f}% "
                 "of points above 0.7")
    print(line)


def _numeric(path, read, key=None):
    """The array ``read()`` returns, or a ``ValueError`` naming the file (and the array's key)
    for object arrays (never unpickled) and arrays that do not hold numbers."""
    label = f"data file {path!r}" + ("" if key is None else f", array {key!r},")
    try:
        array = read()
    except ValueError as err:  # numpy's message for an object array names no file
        raise ValueError(f"{label} is not a numeric array ({err})") from err
    if array.dtype.kind not in "biufc":
        raise ValueError(f"{label} holds dtype {array.dtype}, not numbers")
    return array


def load_data_file(path) -> "torch.Tensor | np.ndarray | tuple | dict":
    """Data from a file: ``.pt`` (a tensor, tuple or dict saved by ``torch.save``, read with
    ``weights_only=True``), ``.npy`` (one array) or ``.npz`` (a dict of arrays).

    Args:
        path: the file.

    Returns:
        What the file holds: a tensor, tuple or dict for ``.pt``, an array for ``.npy``, a
        dict of arrays for ``.npz``.

    Raises:
        ValueError: naming the file, for a missing file, an unknown extension, an unreadable
            torch file, or arrays that are not numbers (object arrays are never unpickled).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    if path.endswith(".pt") or path.endswith(".pth"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"data file {path!r} is not a readable torch file: {err}") from err
    if path.endswith(".npy"):
        return _numeric(path, lambda: np.load(path, allow_pickle=False))
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as arrays:
            return {k: _numeric(path, lambda: arrays[k], k) for k in arrays.files}
    raise ValueError(f"data file {path!r}: use a .pt, .npy or .npz file")


def evaluate_checkpoint(path, model, guide, data, *, num_samples=5000, khat_samples=1000,
                        batch_size=100, chunk_size=500, exact=None, device="auto", seed=0):
    """Load a checkpoint into ``model`` and ``guide`` and evaluate it on ``data``.

    Returns :func:`evaluate`'s report (with the exact log-likelihood if ``exact`` is
    given) and the PSIS k-hat of the guide (``khat``, ``khat_reading`` and, per point,
    ``khat_max`` and ``fraction_unreliable``).
    """
    result = load_fit(model, guide, data, path, device=device)
    report = evaluate(result, data, num_samples=num_samples, batch_size=batch_size,
                      chunk_size=chunk_size, exact=exact, seed=seed)
    khat = psis_khat(result, data, num_samples=khat_samples, batch_size=batch_size,
                     chunk_size=chunk_size, seed=seed)
    report.update({k: v for k, v in khat.items() if k != "khat_points" and k != "num_samples"})
    report["khat_samples"] = khat_samples
    return report


def build_parser():
    parser = argparse.ArgumentParser(
        prog="vi-toolkit",
        description="Variational inference for latent variable models on Pyro and PyTorch.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="fit models with known posteriors and run the examples in quick mode",
        description="Fit models whose posteriors are known in closed form and print both side "
                    "by side, then run the example scripts with --quick.")
    demo.add_argument("--quick", action="store_true", help="short fits (seconds)")
    demo.add_argument("--out", default="out/demo", help="folder for figures and metrics.json")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    evaluate = commands.add_parser(
        "evaluate", help="held-out ELBO, IWAE log-likelihood and PSIS k-hat of a saved fit",
        description="Load a checkpoint written by fit(checkpoint=...) into a model and guide and "
                    "print, on a data set, the ELBO and the importance-weighted log-likelihood "
                    "per data point and the PSIS k-hat of the guide. Example: vi-toolkit evaluate "
                    "fit.pt --model vi_toolkit.models.vae:DeepLatentGaussian --guide vi_toolkit.guides.vae:GaussianEncoder "
                    "--model-kwargs '{\"data_shape\": [1, 8, 8], \"latent_dim\": 10}' "
                    "--guide-kwargs '{\"data_shape\": [1, 8, 8], \"latent_dim\": 10}' "
                    "--dataset digits --split test. A classic model class "
                    "(vi_toolkit.models.gmm:GaussianMixture, vi_toolkit.models.hmm:HiddenMarkovModel, vi_toolkit.models.ppca:PPCA) "
                    "is built with --model-kwargs, its guide class gets it as first argument, "
                    "and its exact log-likelihood at the fit's point estimate is printed too: "
                    "vi-toolkit evaluate fit.pt --model vi_toolkit.models.gmm:GaussianMixture "
                    "--model-kwargs '{\"K\": 3, \"D\": 2}' --guide vi_toolkit.guides.gmm:MAPGuide --data x.pt")
    evaluate.add_argument("checkpoint", help="a checkpoint file written by vi_toolkit.fit")
    evaluate.add_argument("--model", required=True,
                          help="package.module:attribute, a model function, an nn.Module class "
                               "or a classic model class (one with a .model method)")
    evaluate.add_argument("--guide", required=True, help="package.module:attribute of the guide")
    evaluate.add_argument("--model-kwargs", type=_json, default={},
                          help="JSON keyword arguments of the model (its class or function)")
    evaluate.add_argument("--guide-kwargs", type=_json, default={},
                          help="JSON keyword arguments of the guide")
    evaluate.add_argument("--data", help="a .pt (tensor, tuple or dict), .npy or .npz data file")
    evaluate.add_argument("--dataset", default="digits",
                          help="without --data: a built-in image data set (vi_toolkit.datasets)")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--data-root", default=None, help="folder of the image data set")
    evaluate.add_argument("--binarize", default="dynamic", choices=("dynamic", "static", "none"),
                          help="as in training (held-out images are binarized once)")
    evaluate.add_argument("--data-seed", type=int, default=0, help="the data split's seed")
    evaluate.add_argument("--num-points", type=int, default=None, help="the first N points only")
    evaluate.add_argument("--num-samples", type=int, default=5000, help="K of the IWAE estimate")
    evaluate.add_argument("--khat-samples", type=int, default=1000, help="draws for PSIS k-hat")
    evaluate.add_argument("--batch-size", type=int, default=100)
    evaluate.add_argument("--chunk-size", type=int, default=500, help="samples drawn at once")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(run=_evaluate)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        args.run(args)
    except ValueError as err:  # bad input: one clear line, not a traceback
        print(f"vi-toolkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
