"""Stage 2: pretrained checkpoints -> detectron2's format (``to_detectron2.py``), with the
formats it recognises (``formats.py``) and the ResNet check (``resnet_check.py``).

The bottom of the pipeline: ``files.py`` (atomic writes, sha256), ``safe_load.py`` (every
checkpoint read as data only) and ``errors.py`` (the user-error root) serve every stage, and this
package imports no other.
"""
