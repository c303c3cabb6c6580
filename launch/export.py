"""Export a LongformerZh model to stock transformers: a masked-LM model to LongformerForMaskedLM, a
fine-tuned classifier (e.g. a fine-tuning run's ``best`` folder) to LongformerForSequenceClassification.

    python launch/export.py --from MODEL_DIR --to OUT_DIR
    python launch/export.py --from RUN_DIR --to OUT_DIR        # a pretraining run's latest checkpoint
    python launch/export.py --from RUN_DIR/checkpoints/step_3000 --to OUT_DIR
    python launch/export.py --from FINETUNE_DIR/best --to OUT_DIR

The output loads with ``transformers.LongformerForMaskedLM.from_pretrained(OUT_DIR)`` (or
``LongformerForSequenceClassification``) without this package and gives the same logits (the position
table is shifted to Longformer's numbering).
"""
from __future__ import annotations

import argparse
import sys

from lfzh_ds.convert import export_to_hf_longformer
from lfzh_ds.hf_layout import read_config_dict
from lfzh_ds.loading import load_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="model_dir", required=True,
                   help="a LongformerZh model directory (save_pretrained; masked LM or classifier), a run folder of "
                        "launch/pretrain.py or one of its checkpoints/step_N folders")
    p.add_argument("--to", dest="out_dir", required=True, help="output directory for the stock Longformer")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model = load_model(args.model_dir)
    out = export_to_hf_longformer(model, args.out_dir)
    exported_as = read_config_dict(out)["architectures"][0]
    print(f"exported {args.model_dir} -> {out} (transformers.{exported_as}, "
          f"{model.config.max_position_embeddings} positions, window {model.config.attention_window})")


if __name__ == "__main__":
    from launch.cli import run_main

    sys.exit(run_main(main, "export.py"))
