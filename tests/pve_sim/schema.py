"""The real PVE API schema, and checking a request against it as PVE does.

Loads ``apidoc.json``/``apidata.js`` (see ``../shared/pve/README.md``), maps a
request (method, path) to its schema entry and checks every parameter the way
PVE::JSONSchema does, with PVE's own error texts. It does not act on requests:
that is ``server.py``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Prop = dict[str, Any]

# The schema collapses indexed keys to `ide[n]`; most give their range in the description,
# the rest have it only in qemu-server/pve-container (MAX_NETS, MAX_UNUSED_DISKS, ...).
_INDEX_LIMITS = {"hostpci": 16, "ipconfig": 32, "net": 32, "numa": 8, "unused": 256, "usb": 14,
                 "virtiofs": 10, "dev": 256, "mp": 256, "link": 8, "acmedomain": 5}
_RANGE = re.compile(r"\(n is (\d+) to (\d+)")

NOT_IN_SCHEMA = "property is not defined in schema and the schema does not allow additional properties"
MISSING = "property is missing and it is not optional"


class SchemaNotFound(Exception):
    """No schema file in any of the places PVE's README names."""


def schema_candidates() -> list[Path]:
    """Where the schema is looked for, in order (the README of ../shared/pve)."""
    found = []
    if os.environ.get("V2P_PVE_SCHEMA"):
        found.append(Path(os.environ["V2P_PVE_SCHEMA"]))
    found.append(Path("/usr/share/pve-docs/api-viewer/apidata.js"))
    checkout = Path(__file__).resolve().parents[2]
    found += [checkout.parent / "shared/pve/apidoc.json", checkout.parent / "shared/pve/apidata.js"]
    # A copy kept beside this module, should the project decide to carry one (gzipped).
    found.append(Path(__file__).resolve().parent / "apidoc.json.gz")
    return found


def load_tree(path: Path | None = None) -> list[dict[str, Any]]:
    """The schema tree from ``path``, or from the first place that has one."""
    if path is None:
        for candidate in schema_candidates():
            if candidate.is_file():
                path = candidate
                break
        else:
            raise SchemaNotFound("no PVE API schema: set V2P_PVE_SCHEMA or put apidoc.json in "
                                 + str(schema_candidates()[-3].parent))
    if path.suffix == ".gz":
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    if path.name.endswith((".js", ".js.gz")):
        # apidata.js is `const apiSchema = [...];` followed by viewer code.
        text = text[text.index("=") + 1:]
        text = text[:text.index("\n];") + 2] if "\n];" in text else text[:text.rindex(";")]
    tree: list[dict[str, Any]] = json.loads(text)
    return tree


@dataclass(frozen=True)
class Endpoint:
    template: str
    method: str
    info: dict[str, Any]
    path_params: dict[str, str]

    @property
    def properties(self) -> dict[str, Prop]:
        props: dict[str, Prop] = (self.info.get("parameters") or {}).get("properties", {})
        return props


class Schema:
    """The API tree, indexed by path template."""

    def __init__(self, tree: list[dict[str, Any]]) -> None:
        self.nodes: list[tuple[list[str], dict[str, Any]]] = []
        self._index(tree)

    @classmethod
    def load(cls, path: Path | None = None) -> Schema:
        return cls(load_tree(path))

    def _index(self, nodes: list[dict[str, Any]]) -> None:
        for node in nodes:
            self.nodes.append((node["path"].strip("/").split("/"), node))
            self._index(node.get("children") or [])

    def resolve(self, method: str, segments: list[str]) -> Endpoint | None:
        """The schema entry of ``method`` on a path given as its percent-decoded segments
        (a volume id or UPID may hold ``/`` or ``:``), None where PVE answers 501."""
        segments = [s for s in segments if s != ""] or [""]
        best: Endpoint | None = None
        for template, node in self.nodes:
            if len(template) != len(segments) or method not in (node.get("info") or {}):
                continue
            params: dict[str, str] = {}
            for want, got in zip(template, segments, strict=True):
                if want.startswith("{") and want.endswith("}"):
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                # A literal segment wins over a placeholder (`status/current` over `{x}`).
                if best is None or len(params) < len(best.path_params):
                    best = Endpoint(node["path"], method, node["info"][method], params)
        return best

    def validate(self, endpoint: Endpoint, params: dict[str, str | None]) -> dict[str, str]:
        """PVE's errors for ``params`` (path parameters included), empty when PVE accepts them."""
        return check_params(endpoint.properties, params,
                            additional=bool((endpoint.info.get("parameters") or {}).get(
                                "additionalProperties", 0)))


def declared(props: dict[str, Prop], name: str) -> Prop | None:
    """The schema of parameter ``name``, resolving indexed names like ``ide3`` to ``ide[n]``."""
    if name in props:
        return props[name]
    match = re.fullmatch(r"([a-z]+)(\d+)", name)
    if not match or f"{match.group(1)}[n]" not in props:
        return None
    prop = props[f"{match.group(1)}[n]"]
    if match.group(2) != str(int(match.group(2))):
        return None
    index = int(match.group(2))
    limits = _RANGE.search(prop.get("description", ""))
    low, high = (int(limits.group(1)), int(limits.group(2))) if limits else (
        0, _INDEX_LIMITS.get(match.group(1), 1) - 1)
    return prop if low <= index <= high else None


def check_params(props: dict[str, Prop], params: dict[str, str | None], *,
                 additional: bool) -> dict[str, str]:
    """Errors per parameter; a None value (a form key without ``=``) is, as in PVE, only
    checked for its name."""
    errors: dict[str, str] = {}
    for name, value in params.items():
        prop = declared(props, name)
        if prop is None:
            if not additional:
                errors[name] = NOT_IN_SCHEMA
            continue
        if value is None:
            continue
        required = prop.get("requires")
        if isinstance(required, str) and params.get(required) is None:
            errors[required] = f"missing property - '{name}' requires this property"
        error = check_value(name, prop, value)
        if error:
            errors[name] = error
    for name, prop in props.items():
        if "[n]" not in name and not prop.get("optional") and params.get(name) is None:
            errors[name] = MISSING
    return errors


def check_value(name: str, prop: Prop, value: str, *, in_property_string: bool = False) -> str | None:
    """PVE's message for ``value`` of a parameter of schema ``prop``, None when valid."""
    kind = prop.get("type", "string")
    if kind == "boolean":
        # Top-level booleans are `0`/`1` only; inside a property string PVE's
        # parse_boolean also takes true/yes/on and false/no/off.
        ok = value in ("0", "1") or (in_property_string and value.lower() in (
            "true", "yes", "on", "false", "no", "off"))
        return None if ok else f"type check ('boolean') failed - got '{value}'"
    if kind == "integer":
        if not re.fullmatch(r"[+-]?\d+", value):
            return f"type check ('integer') failed - got '{value}'"
    elif kind == "number":
        if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value):
            return f"type check ('number') failed - got '{value}'"
    elif kind == "array":
        return None
    if kind in ("integer", "number"):
        number = float(value)
        if "minimum" in prop and number < float(prop["minimum"]):
            return f"value must have a minimum value of {prop['minimum']}"
        if "maximum" in prop and number > float(prop["maximum"]):
            return f"value must have a maximum value of {prop['maximum']}"
    if "enum" in prop and value not in prop["enum"]:
        return f"value '{value}' does not have a value in the enumeration '{', '.join(prop['enum'])}'"
    if "maxLength" in prop and len(value) > int(prop["maxLength"]):
        return f"value may only be {prop['maxLength']} characters long"
    if "minLength" in prop and len(value) < int(prop["minLength"]):
        return f"value must have at least {prop['minLength']} characters"
    if "pattern" in prop and not re.fullmatch(prop["pattern"], value):
        return "value does not match the regex pattern"
    fmt = prop.get("format")
    if isinstance(fmt, dict):
        return check_property_string(name, fmt, value)
    if isinstance(fmt, str):
        error = check_format(fmt, value)
        if error:
            return f"invalid format - {error}"
    return None


def parse_property_string(fmt: dict[str, Prop], value: str) -> tuple[dict[str, str], list[str]]:
    """``key=value,...`` as PVE::JSONSchema::parse_property_string reads it: (keys, errors)."""
    default_key = next((k for k, p in fmt.items() if p.get("default_key")), None)
    result: dict[str, str] = {}
    errors: list[str] = []
    for part in value.split(","):
        if part == "":
            continue
        match = re.fullmatch(r"([^=]+)=(.+)", part, re.S)
        if match:
            key, val = match.group(1), match.group(2)
            alias = fmt.get(key, {})
            if "keyAlias" in alias:
                if alias["keyAlias"] in result:
                    errors.append(f"duplicate key in comma-separated list property: {alias['keyAlias']}")
                result[alias["keyAlias"]] = key
                key = alias["alias"]
            elif "alias" in alias:
                key = alias["alias"]
            if key in result:
                errors.append(f"duplicate key in comma-separated list property: {key}")
            result[key] = val
        elif default_key is not None:
            if default_key in result:
                errors.append(f"duplicate key in comma-separated list property: {default_key}")
            result[default_key] = part
        else:
            errors.append("value without key, but schema does not define a default key")
    return result, errors


def check_property_string(name: str, fmt: dict[str, Prop], value: str) -> str | None:
    keys, errors = parse_property_string(fmt, value)
    problems = [f"{name}: {e}" for e in errors]
    for key, val in keys.items():
        prop = fmt.get(key)
        if prop is None or "alias" in prop:
            problems.append(f"{name}.{key}: {NOT_IN_SCHEMA}")
            continue
        error = check_value(f"{name}.{key}", prop, val, in_property_string=True)
        if error:
            problems.append(f"{name}.{key}: {error}")
    for key, prop in fmt.items():
        if "alias" not in prop and not prop.get("optional") and key not in keys:
            problems.append(f"{name}.{key}: {MISSING}")
    if not problems:
        return None
    return "invalid format - format error\n" + "".join(p + "\n" for p in problems)


_STORAGE_ID = r"[a-z][a-z0-9\-_.]*[a-z0-9]"
_VOLUME_ID = re.compile(rf"^({_STORAGE_ID}):(.+)$", re.I)
_DISK_KEY = re.compile(r"^(ide|sata|scsi|virtio|efidisk|tpmstate|unused)\d+$")


def check_format(fmt: str, value: str) -> str | None:
    """The named formats v2p's requests use, with PVE's messages; other named formats pass."""
    if fmt.endswith("-list") and fmt[:-5] in _FORMATS:
        for item in re.split(r"[,; ]+", value.strip()):
            error = check_format(fmt[:-5], item) if item else None
            if error:
                return error
        return None
    check = _FORMATS.get(fmt)
    return check(value) if check else None


def _vmid(value: str) -> str | None:
    return None if re.fullmatch(r"[1-9][0-9]{2,8}", value) else "value does not look like a valid VM ID"


def _node(value: str) -> str | None:
    ok = re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?", value)
    return None if ok else "value does not look like a valid node name"


def _storage(value: str) -> str | None:
    ok = re.fullmatch(_STORAGE_ID, value, re.I)
    return None if ok else f"storage ID '{value}' contains illegal characters"


def _configid(value: str) -> str | None:
    return None if re.fullmatch(r"[a-z][a-z0-9_]+", value) else "invalid configuration ID"


def _mac(value: str) -> str | None:
    ok = re.fullmatch(r"[a-f0-9][02468ace](:[a-f0-9]{2}){5}", value, re.I)
    return None if ok else "value does not look like a valid unicast MAC address"


def _volume_id(value: str) -> str | None:
    return None if _VOLUME_ID.match(value) else "unable to parse volume ID"


def _volume_or_path(value: str) -> str | None:
    return None if value.startswith("/") else _volume_id(value)


def _volume_or_qm_path(value: str) -> str | None:
    return None if value in ("none", "cdrom") or value.startswith("/") else _volume_id(value)


def _dns_name(value: str) -> str | None:
    label = r"[a-zA-Z0-9]([a-zA-Z0-9\-]*[a-zA-Z0-9])?"
    ok = re.fullmatch(rf"({label}\.)*{label}", value)
    return None if ok else "value does not look like a valid DNS name"


def _bridge(value: str) -> str | None:
    return None if re.fullmatch(r"[-_.\w\d]+", value) else "invalid bridge ID"


def _boot(value: str) -> str | None:
    # pve-qm-boot is itself a property string: [[legacy=]<[acdn]{1,4}>][,order=<dev[;dev...]>]
    keys, errors = parse_property_string(
        {"legacy": {"default_key": 1, "optional": 1}, "order": {"optional": 1}}, value)
    if errors or set(keys) - {"legacy", "order"}:
        return "format error"
    if "legacy" in keys and not re.fullmatch(r"[acdn]{1,4}", keys["legacy"]):
        return "value does not match the regex pattern"
    for device in filter(None, keys.get("order", "").split(";")):
        if not re.fullmatch(r"(ide|sata|scsi|virtio|net|hostpci|usb)\d+", device):
            return f"invalid boot device '{device}'"
    return None


def _bootdisk(value: str) -> str | None:
    return None if re.fullmatch(r"(ide|sata|scsi|virtio)\d+", value) else f"invalid drive name '{value}'"


def _disk_size(value: str) -> str | None:
    return None if re.fullmatch(r"\d+(\.\d+)?[KMGT]?", value) else f"unable to parse size '{value}'"


def _content(value: str) -> str | None:
    known = ("images", "rootdir", "vztmpl", "iso", "backup", "snippets", "import", "none")
    return None if value in known else f"invalid content type '{value}'"


def _userid(value: str) -> str | None:
    ok = re.fullmatch(r"[^\s:/]+@[A-Za-z][A-Za-z0-9\.\-_]+", value) and len(value) <= 64
    return None if ok else "value does not look like a valid user name"


_FORMATS = {
    "pve-vmid": _vmid, "pve-node": _node, "pve-storage-id": _storage, "pve-configid": _configid,
    "mac-addr": _mac, "pve-volume-id": _volume_id, "pve-volume-id-or-absolute-path": _volume_or_path,
    "pve-volume-id-or-qm-path": _volume_or_qm_path, "pve-bridge-id": _bridge, "pve-qm-boot": _boot,
    "pve-qm-bootdisk": _bootdisk, "disk-size": _disk_size, "pve-storage-content": _content,
    "pve-userid": _userid, "dns-name": _dns_name,
}
