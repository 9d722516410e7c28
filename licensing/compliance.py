"""The Llama 4 Community License's duties besides the MAU count (section 1.b), as checks and helpers.

When Llama materials, or a model made with them, are distributed or made available, the licence asks for:
a copy of the agreement with them; a NOTICE file with the exact sentence below; "Built with Llama" displayed
(product documentation, such as a model card README, counts); and, for a model trained with Llama, a name that
begins with "Llama". `check_model_dir` lists what a model or adapter folder lacks; fine-tuning reuses it.
"""
from __future__ import annotations

from pathlib import Path

from common.errors import UserError

NOTICE_TEXT = ("Llama 4 is licensed under the Llama 4 Community License, "
               "Copyright © Meta Platforms, Inc. All Rights Reserved.")
BUILT_WITH = "Built with Llama"
AGREEMENT_TITLE = "Llama 4 Community License"
PREFIX_RULE = ("Llama 4 Community License, section 1.b.i: if you use the Llama materials to create, train, fine "
               "tune, or otherwise improve an AI model which is distributed or made available, you shall also "
               'include "Llama" at the beginning of any such AI model name')
_AGREEMENT_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LLAMA_4_COMMUNITY_LICENSE", "LLAMA_4_LICENSE",
                    "LLAMA4_LICENSE", "LLAMA_4_COMMUNITY_LICENSE.txt", "LLAMA_4_LICENSE.txt")


def require_llama_prefix(name: str, distributed: bool) -> None:
    """Raise a UserError quoting the licence when a distributed model's name does not begin with "Llama"."""
    if distributed and not name.startswith("Llama"):
        raise UserError(f"model name {name!r} must begin with \"Llama\" because the model is distributed or made "
                        f"available ({PREFIX_RULE}); rename it, e.g. 'Llama-4-{name}'")


def write_notice(path: str | Path) -> Path:
    """Write the NOTICE file the licence asks for into a model folder; returns its path."""
    out = Path(path) / "NOTICE"
    out.write_text(NOTICE_TEXT + "\n", encoding="utf-8")
    return out


def _agreement(folder: Path) -> Path | None:
    for name in _AGREEMENT_NAMES:
        p = folder / name
        if p.is_file() and AGREEMENT_TITLE in p.read_text(encoding="utf-8", errors="replace"):
            return p
    return None


def check_model_dir(path: str | Path, distributed: bool, name: str | None = None) -> list[str]:
    """Problems that keep a model/adapter folder from meeting section 1.b; empty list = compliant.

    `name` is the model's published name (default: the folder's name). The name and "Built with Llama" rules
    apply only when the model is distributed or made available.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{str(folder)!r} is not a folder; pass a model or adapter directory")
    problems = []
    notice = folder / "NOTICE"
    if not notice.is_file():
        problems.append(f'no NOTICE file: it must contain "{NOTICE_TEXT}" '
                        "(licensing.write_notice writes it)")
    elif NOTICE_TEXT not in notice.read_text(encoding="utf-8", errors="replace"):
        problems.append(f'NOTICE does not contain the required text "{NOTICE_TEXT}"')
    if _agreement(folder) is None:
        problems.append(f"no copy of the {AGREEMENT_TITLE} Agreement (a file named LICENSE or "
                        f"LLAMA_4_COMMUNITY_LICENSE containing it): the licence asks for one with any "
                        "distributed Llama materials")
    if distributed:
        model_name = name or folder.resolve().name
        try:
            require_llama_prefix(model_name, True)
        except UserError as e:
            problems.append(str(e))
        readme = folder / "README.md"
        if not readme.is_file() or BUILT_WITH not in readme.read_text(encoding="utf-8", errors="replace"):
            problems.append(f'README.md does not display "{BUILT_WITH}" (section 1.b.i asks for it on the '
                            "model's documentation or related website)")
    return problems
