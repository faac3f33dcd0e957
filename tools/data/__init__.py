"""`make data`: every dataset of the protocol from nothing (tools/data/recipes.json: files,
sources with mirrors, checksums, layout, official counts), downloaded through convert/fetch.py,
extracted and converted into detectron2's layout under the dataset root, counted, and recorded
in ``<root>/datasets-manifest.json`` for ``make doctor``."""
