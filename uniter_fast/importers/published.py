"""What the importers of published files share: naming an image's img_db key from a pattern the user may override."""

from __future__ import annotations

from typing import Any

from uniter_fast.data.task_records import image_key
from uniter_fast.errors import ConfigError


def image_name(pattern: str, option: str, **fields: Any) -> str:
    """The img_db key ``pattern.format(**fields)`` (".npz" added when missing); a ``ConfigError`` naming ``--option``
    and the fields it may use when the pattern does not format."""
    try:
        return image_key(pattern.format(**fields))
    except KeyError as err:
        raise ConfigError(
            f"--{option} {pattern!r}: unknown field {{{err.args[0]}}}; expected fields among {sorted(fields)}"
        ) from None
    except (ValueError, IndexError) as err:
        given = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        raise ConfigError(f"--{option} {pattern!r} does not format with {given}: {err}") from None
