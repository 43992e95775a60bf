"""``python -m rlhf.models merge ADAPTER_DIR OUT_DIR``: a LoRA adapter folder as a merged Hugging
Face folder (safetensors) that loads without ``peft``."""

from __future__ import annotations

import argparse
import sys

from rlhf.config.sections import ModelConfig
from rlhf.errors import InputError
from rlhf.models.lora import ADAPTER_CONFIG, adapter_base, is_adapter_folder
from rlhf.models.policy import load_policy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.models", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="fold an adapter into its base and save the result")
    merge.add_argument("adapter_dir", help="a folder saved with lora.publish=adapter")
    merge.add_argument("out_dir", help="where the merged model and its tokenizer go")
    args = parser.parse_args(argv)
    if not is_adapter_folder(args.adapter_dir):
        parser.error(f"ADAPTER_DIR: {args.adapter_dir} has no {ADAPTER_CONFIG}; pass a folder saved "
                     "with lora.publish=adapter")
    try:
        base = adapter_base(args.adapter_dir)
        load_policy(ModelConfig(name_or_path=args.adapter_dir)).save(args.out_dir)
    except InputError as failure:
        parser.error(str(failure))
    print(f"merged {args.adapter_dir} into its base {base}: {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
