"""`hf-msvit`: command-line tools over the models.

    hf-msvit visualize MODEL IMAGE [--output gates.png] [--gate-threshold 0.6]
    hf-msvit push-demo SPACE_ID MODEL_ID [--private] [--title TITLE]

MODEL is a checkpoint directory or Hub id (MSViT or DiT) that carries its image processor. `push-demo` creates a
Gradio Space (SPACE_ID) running the compute-knob demo on a model already on the Hub (MODEL_ID).
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
    args = parser.parse_args(argv)
    if args.command == "visualize":
        return _visualize(args)
    if args.command == "push-demo":
        return _push_demo(args)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
