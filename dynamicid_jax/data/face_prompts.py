"""Face prompts of the reconfiguration data: KDEF file names -> the paper's prompt form.

KDEF names pictures `AF01AFFL.JPG`: session (A|B), sex (F|M), two-digit id, expression code,
view code. The DynamicID training prompt for them is
"the expression is {expression}, the face is {view}".
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

KDEF_EXPRESSIONS = {
    "AF": "afraid",
    "AN": "angry",
    "DI": "disgusted",
    "HA": "happy",
    "NE": "neutral",
    "SA": "sad",
    "SU": "surprised",
}
KDEF_VIEWS = {
    "FL": "fully turned to the left",
    "FR": "fully turned to the right",
    "HL": "slightly turned to the left",
    "HR": "slightly turned to the right",
    "S": "front view",
}
_KDEF_NAME = re.compile(
    r"^(?P<session>[AB])(?P<sex>[FM])(?P<id>\d{2})(?P<expression>AF|AN|DI|HA|NE|SA|SU)"
    r"(?P<view>FL|FR|HL|HR|S)\.(?:jpe?g|png|bmp|webp)$",
    re.IGNORECASE,
)


@dataclasses.dataclass(frozen=True)
class KdefName:
    """The fields encoded in a KDEF file name (codes upper-cased)."""

    session: str
    sex: str
    person: str
    expression: str
    view: str


def parse_kdef_name(file_name: str) -> Optional[KdefName]:
    """`AF01AFS.JPG` -> KdefName(session='A', sex='F', person='01', expression='AF', view='S');
    None when the (base) name is not KDEF-style."""
    m = _KDEF_NAME.match(file_name.rsplit("/", 1)[-1])
    if m is None:
        return None
    return KdefName(m["session"].upper(), m["sex"].upper(), m["id"], m["expression"].upper(), m["view"].upper())


def kdef_face_prompt(name: KdefName) -> str:
    """"the expression is happy, the face is front view"."""
    return f"the expression is {KDEF_EXPRESSIONS[name.expression]}, the face is {KDEF_VIEWS[name.view]}"
