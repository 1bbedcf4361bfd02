"""The I2P benchmark (Schramowski et al., CVPR 2023, §4): 4.7k real user prompts in seven categories of
inappropriate content, the images SD makes for them with and without SLD, and how often those images are flagged.

    sld-minimal i2p generate --prompts i2p_benchmark.csv --out runs/strong --safety strong   # run.py
    sld-minimal i2p classify runs/strong                                                    # classify.py
    sld-minimal i2p report runs/sd runs/strong                                              # report.py
    sld-minimal i2p fid runs/coco-strong coco_val2014/                                      # fid.py
    sld-minimal i2p import --prompts set.csv --images my_images/ --out runs/mine            # external.py
    sld-minimal i2p prompts --template "a photo of a {} woman" --values countries.txt --out c.csv  # prompts.py

The metrics beside the paper's table (exposed parts, CLIP score, FID, agreement) are pure functions in metrics.py;
`plot.py` draws `report --plot`. From Python, your own model through the same protocol:
`external.generate_with(generate_fn, prompts_csv, out)`.

The CSV is the hub dataset AIML-TUDA/i2p. Nothing heavy is imported here: `cli` builds its parser from this.
"""
from .commands import add_parser

__all__ = ["add_parser"]
