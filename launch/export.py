"""Export a LongformerZh masked-LM model to stock transformers.LongformerForMaskedLM.

    python launch/export.py --from MODEL_DIR --to OUT_DIR
    python launch/export.py --from RUN_DIR --to OUT_DIR        # a pretraining run's latest checkpoint
    python launch/export.py --from RUN_DIR/checkpoints/step_3000 --to OUT_DIR

The output loads with ``transformers.LongformerForMaskedLM.from_pretrained(OUT_DIR)`` without this
package and gives the same logits (the position table is shifted to Longformer's numbering).
"""
from __future__ import annotations

import argparse

from lfzh_ds.convert import export_to_hf_longformer
from lfzh_ds.modeling import LongformerZhForMaskedLM


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="model_dir", required=True,
                   help="a LongformerZh model directory (save_pretrained), a run folder of launch/pretrain.py "
                        "or one of its checkpoints/step_N folders")
    p.add_argument("--to", dest="out_dir", required=True, help="output directory for the stock Longformer")
    return p.parse_args(argv)


def load_source_model(path) -> LongformerZhForMaskedLM:
    from lfzh_ds.training.checkpoint import is_training_checkpoint, load_model_from_run

    if is_training_checkpoint(path):  # a run of launch/pretrain.py (its latest checkpoint) or RUN_DIR/checkpoints/step_N
        return load_model_from_run(path)
    return LongformerZhForMaskedLM.from_pretrained(path)


def main(argv=None):
    args = parse_args(argv)
    model = load_source_model(args.model_dir)
    out = export_to_hf_longformer(model, args.out_dir)
    print(f"exported {args.model_dir} -> {out} (transformers.LongformerForMaskedLM, "
          f"{model.config.max_position_embeddings} positions, window {model.config.attention_window})")


if __name__ == "__main__":
    main()
