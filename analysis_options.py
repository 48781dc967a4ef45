"""The models `hdistill analyze` and `hdistill eval` look at: teachers by role and trained students, chosen by one
set of options (ModelsConfig; no torch at import)."""
from __future__ import annotations

from dataclasses import dataclass

import click

from hdistill.common.errors import HdistillError
from hdistill.common.options import option, parse_kwargs, parse_pairs, parse_role_kwargs, split
from hdistill.precompute.config import (MODEL_ARG_HELP, MODEL_HELP, RANDOM_INIT_HELP, WEIGHTS_HELP, check_roles,
                                        every_role, parse_weights)


@dataclass
class ModelsConfig:
    teachers: list[str] = option(default_factory=list, cli="", parse=lambda value, _: split(value),
                                 help="Comma-separated teacher roles (e.g. mae,clip).")
    models: dict[str, str] = option(default_factory=dict, flag="--model", multiple=True, metavar="ROLE=NAME",
                                    parse=parse_pairs, help=MODEL_HELP)
    model_args: dict[str, dict] = option(default_factory=dict, flag="--model-arg", multiple=True,
                                         metavar="ROLE.KEY=VALUE", parse=parse_role_kwargs, help=MODEL_ARG_HELP)
    weights: dict[str, str] = option(default_factory=dict, multiple=True, metavar="ROLE=hub|PATH",
                                     parse=parse_weights, help=WEIGHTS_HELP)
    random_init: bool = option(False, RANDOM_INIT_HELP, is_flag=True)
    student_weights: list[str] = option(
        default_factory=list, multiple=True, type=click.Path(exists=True, dir_okay=False),
        help="A trained student.safetensors (built as its metadata says), named by its path in the output. "
             "Repeatable.")
    student: str | None = option(None, "timm name of the students' architecture (default: the one each "
                                       "--student-weights file records).")
    student_args: dict = option(default_factory=dict, flag="--student-arg", multiple=True, metavar="KEY=VALUE",
                                parse=parse_kwargs, help="timm argument of the students, e.g. depth=6 (default: "
                                                         "those each file records).")
    image_size: int | None = option(None, type=click.IntRange(min=1),
                                    help="View size in pixels (default: the students' recorded size, else 224).")
    seed: int = option(0, "Seed of random teacher weights and of the views.")

    def __post_init__(self):
        self.weights = every_role(self.weights, self.teachers)

    def build(self) -> dict:
        """{label: Teacher}: each trained student under its path, then each teacher under its role."""
        from hdistill.analyze import student_as_teacher
        from hdistill.precompute.teachers import build_teachers

        check_roles(self.teachers)
        chosen = {}
        for path in self.student_weights:   # each as its file's metadata says, unless --student/--student-arg say
            chosen[path] = student_as_teacher(path, self.student, self.image_size, self.student_args)
        # teachers at the students' view size unless --image-size says otherwise
        image_size = self.image_size or next((m.info.image_size for m in chosen.values()), 224)
        chosen.update(build_teachers(self, image_size=image_size))
        if not chosen:
            raise HdistillError("no model given: pass --teachers and/or --student-weights")
        return chosen
