"""`hf-msvit`: command-line tools over the models.

    hf-msvit visualize MODEL IMAGE [--output gates.png] [--gate-threshold 0.6]
    hf-msvit push-demo SPACE_ID MODEL_ID [--private] [--title TITLE]
    hf-msvit export MODEL model.onnx --fine-region-budget 0.5     # MSViT
    hf-msvit export MODEL model.onnx --static                     # DiT on PVTv2's route
    hf-msvit export MODEL model.onnx --compute-budget 0.7         # DiT, exact budget

MODEL is a checkpoint directory or Hub id (MSViT or DiT) that carries its image processor. `push-demo` creates a
Gradio Space (SPACE_ID) running the compute-knob demo on a model already on the Hub (MODEL_ID). `export` writes an
ONNX graph with a dynamic batch and the mode, budget and image size baked in (docs/deploy.md), after checking it in
onnxruntime against PyTorch.
"""

import argparse
import sys


def _visualize(args) -> int:
    from pathlib import Path

    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import hf_msvit  # noqa: F401  (registers the classes)

    from .visualization import visualize

    if not Path(args.image).is_file():
        print(f"error: image {args.image!r} does not exist", file=sys.stderr)
        return 2
    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    visualize(
        model, args.image, output_path=args.output, image_processor=processor, gate_threshold=args.gate_threshold
    )
    print(f"wrote {args.output}")
    return 0


def _push_demo(args) -> int:
    from .hub import HubPushError, push_demo_space

    try:
        url = push_demo_space(args.space_id, args.model_id, private=args.private or None, title=args.title)
    except (ValueError, HubPushError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1
    print(f"Space updated: {url}")
    return 0


def _budget(text: str) -> int | float:
    """`--fine-region-budget`: an integer is a number of regions, anything else a fraction."""
    return int(text) if text.isdigit() else float(text)


def _export(args) -> int:
    from .export import ExportCheckError, export_onnx

    try:
        result = export_onnx(
            args.model, args.output, fine_region_budget=args.fine_region_budget, compute_budget=args.compute_budget,
            static=args.static, batch_size=args.batch_size, image_size=args.image_size,
            dynamic_batch=not args.fixed_batch, opset_version=args.opset, check=not args.no_check,
        )  # fmt: skip
    except (ValueError, ImportError, OSError, ExportCheckError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    batch = f"batch {args.batch_size}" if args.fixed_batch else "dynamic batch"
    print(f"wrote {result.path} ({result.mode.describe()}, {batch})")
    if result.max_abs_diff is not None:
        print(f"onnxruntime matches PyTorch: max |difference| of {result.mode.output_name} {result.max_abs_diff:.2g}")
    return 0


def _add_export_parser(commands) -> None:
    export = commands.add_parser("export", help="export a model to ONNX with fixed shapes (docs/deploy.md)")
    export.add_argument("model", help="checkpoint directory or Hub id")
    export.add_argument("output", help="ONNX file to write, e.g. model.onnx")
    mode = export.add_mutually_exclusive_group()
    mode.add_argument("--fine-region-budget", type=_budget, help="MSViT: fraction (0.5) or count (24) of fine regions")
    mode.add_argument("--compute-budget", type=float, help="DiT: fraction of the static route's cost per image")
    mode.add_argument("--static", action="store_true", help="DiT: PVTv2's static route")
    export.add_argument("--batch-size", type=int, default=2, help="images of the example input (default 2)")
    export.add_argument("--fixed-batch", action="store_true", help="bake --batch-size in instead of a dynamic batch")
    export.add_argument("--image-size", type=int, default=None, help="DiT: image size of the graph (default: config)")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    export.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with PyTorch")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-msvit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    vis = commands.add_parser("visualize", help="save a PNG of the gate decisions of a model on one image")
    vis.add_argument("model", help="checkpoint directory or Hub id")
    vis.add_argument("image", help="path of the image")
    vis.add_argument("--output", default="gates.png", help="PNG to write (default: gates.png)")
    vis.add_argument("--gate-threshold", type=float, default=None, help="gate threshold for this picture")
    space = commands.add_parser("push-demo", help="create a Gradio Space running the demo on a Hub model")
    space.add_argument("space_id", help="the Space to create or update, e.g. me/msvit-demo")
    space.add_argument("model_id", help="the model on the Hub the Space shows, e.g. me/msvit-digits")
    space.add_argument("--private", action="store_true", help="create the Space private")
    space.add_argument("--title", default=None, help="the Space's title")
    _add_export_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "visualize":
        return _visualize(args)
    if args.command == "push-demo":
        return _push_demo(args)
    if args.command == "export":
        return _export(args)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
