"""`python -m train.export`: write a drafter folder in z-lab's DFlash layout
(`DFlashDraftModel`) or the EAGLE-3 layout (`LlamaForCausalLMEagle3`), the layouts vLLM
and SGLang load, or stop with one line saying why it cannot be written faithfully
(dspark_jax/drafters/zlab_export.py and eagle3_export.py decide).

    python -m train.export --target T --draft DIR --layout zlab|eagle3 --out OUT
"""

from __future__ import annotations

import argparse

from dspark_jax.errors import DefaultsFormatter, cli_errors


def main(argv=None) -> None:
    """Parse the arguments, export, print the folder written."""
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--target", required=True, help="the target folder the drafter serves (checked against it)")
    p.add_argument("--draft", required=True, help="the drafter folder to export")
    p.add_argument("--layout", default="zlab", choices=["zlab", "eagle3"], help="the layout written")
    p.add_argument("--out", required=True, help="the folder written (not --draft)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="tensor dtype written")
    args = p.parse_args(argv)
    with cli_errors("train.export"):
        if args.layout == "eagle3":
            from dspark_jax.drafters.eagle3_export import export_folder

            out = export_folder(args.draft, args.target, args.out, dtype=args.dtype)
        else:
            from dspark_jax.drafters.zlab_export import export_folder

            out = export_folder(args.draft, args.target, args.out, args.layout, dtype=args.dtype)
        print(f"exported {args.draft} in the {args.layout} layout to {out}")


if __name__ == "__main__":
    main()
