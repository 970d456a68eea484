"""Checkpoints: written atomically, validated on load, last K kept.

Layout of `RUN_DIR/checkpoints/step_NNNNNNN/`:
  model.safetensors       fp32 weights by parameter name (canonical engine state)
  optimizer.safetensors   "exp_avg/<name>" and "exp_avg_sq/<name>" fp32 moments
  rng.safetensors         torch CPU (and CUDA) generator states
  state.json              trainer step, optimizer step and extras, data cursor, Python RNG
  manifest.json           size and sha256 of every file above; written last
A run of N > 1 ranks writes shards instead of the two large files: rank r writes
`model-RRRRR-of-NNNNN.safetensors` and `optimizer-RRRRR-of-NNNNN.safetensors` holding the
parameters it owns, rank 0 the rest, and the manifest says `"shards": N`. Each rank hashes the
files it wrote, right after writing them; rank 0 gathers the descriptions into the manifest.
Loading merges the shards by parameter name into the canonical state, so any number of ranks can
resume it: every rank reads all weights but only the moments of the parameters it keeps, the
ranks share the hashing out (each file hashed once) and agree on which checkpoint they load.
A checkpoint is built in a hidden temporary folder, every file fsynced, then renamed into place, so
a crash mid-save leaves the previous checkpoint as the latest good one. Nothing is unpickled.

`layout` names and describes the files, `save` writes a checkpoint, `load` reads and verifies one.
"""

from homestar.train.checkpoint.layout import FORMAT, shard_files
from homestar.train.checkpoint.load import load_checkpoint, load_latest, load_weights, restore_rng
from homestar.train.checkpoint.save import save_checkpoint
from homestar.train.run_files import list_checkpoints

__all__ = ["FORMAT", "list_checkpoints", "load_checkpoint", "load_latest", "load_weights", "restore_rng",
           "save_checkpoint", "shard_files"]
