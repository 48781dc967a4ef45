"""The run folder's names: what a run writes there, and a sweep in its folder and in one folder per member."""

CHECKPOINT = "checkpoint.pt"           # the latest checkpoint (torch.save, loads with weights_only=True)
HISTORY = "checkpoints"                # earlier checkpoints kept by --keep-checkpoints, one file per step
METRICS = "metrics.jsonl"              # one record per logged step and evaluation
EXPORT = "student.safetensors"         # the student's backbone, for timm's pretrained path
OPTIONS = "config.yaml"                # the run's options, which hdistill train --config loads again
LOCK = ".lock"                         # held while a process writes the folder
RECORD = "sweep.json"                  # a sweep's step and its members' states
PENDING = CHECKPOINT + ".pending-"     # a sweep member's checkpoint of step N, written but not yet recorded
