"""The SDK's response types, lazily built over the decoded JSON, and its
``NOT_GIVEN`` sentinel."""

from __future__ import annotations

import copy as _copy
import json
import re
from typing import Any, ClassVar, Dict, Iterator, List, Mapping, Optional, Tuple, Type, TypeVar

# =============================================================================
# sentinels
# =============================================================================


class NotGiven:
    """The SDK's "argument not given" sentinel (``NOT_GIVEN``); such arguments are not sent."""

    _instance: ClassVar[Optional["NotGiven"]] = None

    def __new__(cls) -> "NotGiven":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = NotGiven()


def _given(v: Any) -> bool:
    """False for this module's NOT_GIVEN and for the SDK's ``NOT_GIVEN``/``omit``
    (recognised by class name: the openai package is never imported)."""
    return v is not NOT_GIVEN and type(v).__name__ not in ("NotGiven", "Omit")


# =============================================================================
# declared field types: how the SDK builds, checks and dumps a field's value
# =============================================================================
#
# The SDK builds responses with ``construct`` (no validation), with one
# twist: a field typed ``Optional[X]`` (any union) is first *validated* as a
# whole in pydantic's lax mode (``"2"`` -> 2 for an int, 1 -> 1.0 for a
# float), and only when that fails is it constructed as it is. A required
# field is constructed: a required float turns an exact int into a float,
# every other required scalar keeps what the server sent. These classes
# mirror that, lazily: a value is checked, coerced and wrapped when it is
# first read or dumped, never per chunk.

_FAIL: Any = object()  # validate()'s "does not validate"
_VALID = " valid"  # the cache key that marks an object built from validated data (no field has this name)
_INT_RE = re.compile(r"([+-]?[0-9]+(?:_[0-9]+)*)(?:\.0+)?", re.ASCII)


def _lax_int(v: Any) -> Any:
    """pydantic's lax int: ints, bools, integral floats, integer strings (or _FAIL)."""
    c = v.__class__
    if c is int:
        return v
    if c is bool:
        return int(v)
    if c is float:
        return int(v) if v.is_integer() else _FAIL
    if c is str:
        m = _INT_RE.fullmatch(v.strip())
        return _FAIL if m is None else int(m.group(1))
    return _FAIL


def _lax_float(v: Any) -> Any:
    """pydantic's lax float: numbers, bools, numeric strings (or _FAIL)."""
    c = v.__class__
    if c is float:
        return v
    if c is int or c is bool:
        try:
            return float(v)
        except OverflowError:
            return _FAIL
    if c is str:
        s = v.strip()
        if not s.isascii():
            return _FAIL
        if s[:2].lower() in ("0x", "0o", "0b") or s[1:3].lower() in ("0x", "0o", "0b"):
            return _FAIL
        try:
            return float(s)
        except ValueError:
            return _FAIL
    return _FAIL


def _check(t: "_Type", v: Any) -> Any:
    """``v`` validated as ``t`` (None only where ``t`` is optional)."""
    if v is None:
        return None if t.optional else _FAIL
    return t.validate(v)


class _Type:
    """A declared field type. The base is ``object``: anything goes, as it is."""

    __slots__ = ()
    #: absent is valid (the field has the default None)
    optional = False
    #: the model class a field holds (directly, in a list or optional), if any
    model: Any = None

    def validate(self, v: Any) -> Any:
        """``v`` (not None) as pydantic's lax validation leaves it, or ``_FAIL``; a
        container is copied only when something in it changed."""
        return v

    def build(self, v: Any, valid: bool = False) -> Any:
        """``v`` (not None) as the SDK's ``construct`` leaves it (models wrapped;
        ``valid``: ``v`` passed validation, so its objects are validated ones)."""
        return v

    def dump(self, v: Any, o: "_DumpOpts") -> Any:
        """``v`` (not None) as the SDK's ``model_dump`` gives it."""
        return _plain(v)


class _StrT(_Type):
    __slots__ = ()

    def validate(self, v: Any) -> Any:
        return v if v.__class__ is str else _FAIL


class _LitT(_Type):
    __slots__ = ("values",)

    def __init__(self, *values: str) -> None:
        self.values = frozenset(values)

    def validate(self, v: Any) -> Any:
        return v if v.__class__ is str and v in self.values else _FAIL


class _IntT(_Type):
    __slots__ = ()

    def validate(self, v: Any) -> Any:
        return _lax_int(v)

    def dump(self, v: Any, o: "_DumpOpts") -> Any:
        if o.json and v.__class__ is bool:  # pydantic's int serializer writes a bool as 0/1 in JSON
            return int(v)
        return _plain(v)


class _FloatT(_Type):
    __slots__ = ()

    def validate(self, v: Any) -> Any:
        return _lax_float(v)

    def build(self, v: Any, valid: bool = False) -> Any:
        if isinstance(v, int):  # construct: an int becomes a float when that is exact
            try:
                f = float(v)
            except OverflowError:
                return v
            return f if f == v else v
        return v

    def dump(self, v: Any, o: "_DumpOpts") -> Any:
        return _plain(self.build(v))


class _OptT(_Type):
    """``Optional[t]``: validated first; constructed as ``t`` when that fails."""

    __slots__ = ("t",)
    optional = True

    def __init__(self, t: _Type) -> None:
        self.t = t

    @property
    def model(self) -> Any:  # type: ignore[override]
        return self.t.model

    def validate(self, v: Any) -> Any:
        return self.t.validate(v)

    def build(self, v: Any, valid: bool = False) -> Any:
        r = self.t.validate(v)
        return self.t.build(v, False) if r is _FAIL else self.t.build(r, True)

    def dump(self, v: Any, o: "_DumpOpts") -> Any:
        r = self.t.validate(v)
        return self.t.dump(v if r is _FAIL else r, o)


class _ListT(_Type):
    __slots__ = ("t",)

    def __init__(self, t: _Type) -> None:
        self.t = t

    @property
    def model(self) -> Any:  # type: ignore[override]
        return self.t.model

    def validate(self, v: Any) -> Any:
        if v.__class__ is not list:
            return _FAIL
        t, out = self.t, None
        for i, e in enumerate(v):
            r = _check(t, e)
            if r is _FAIL:
                return _FAIL
            if r is not e:
                if out is None:
                    out = list(v)
                out[i] = r
        return v if out is None else out

    def build(self, v: Any, valid: bool = False) -> Any:
        if v.__class__ is not list:
            return v
        t = self.t
        if t.__class__ is _ModelT:
            w = t.cls._w_valid if valid else t.cls._w  # type: ignore[attr-defined]
            return [w(e) if e.__class__ is dict else (None if e is None else t.build(e)) for e in v]
        return [None if e is None else t.build(e, valid) for e in v]

    def dump(self, v: Any, o: "_DumpOpts") -> Any:
        if v.__class__ is not list:
            return _plain(v)
        t = self.t
        return [None if e is None else t.dump(e, o) for e in v]


class _DictT(_Type):
    """``Dict[str, t]``."""

    __slots__ = ("t",)

    def __init__(self, t: _Type) -> None:
        self.t = t

    def validate(self, v: Any) -> Any:
        if v.__class__ is not dict:
            return _FAIL
        t, out = self.t, None
        for k, e in v.items():
            r = _check(t, e)
            if r is _FAIL or k.__class__ is not str:
                return _FAIL
            if r is not e:
                if out is None:
                    out = dict(v)
                out[k] = r
        return v if out is None else out

    def build(self, v: Any, valid: bool = False) -> Any:
        if v.__class__ is not dict:
            return v
        t = self.t
        return {k: None if e is None else t.build(e, valid) for k, e in v.items()}

    def dump(self, v: Any, o: "_DumpOpts") -> Any:
        if v.__class__ is not dict:
            return _plain(v)
        t = self.t
        return {k: None if e is None else t.dump(e, o) for k, e in v.items()}


class _ModelT(_Type):
    __slots__ = ("cls",)

    def __init__(self, cls: Type["BaseModel"]) -> None:
        self.cls = cls

    @property
    def model(self) -> Any:  # type: ignore[override]
        return self.cls

    def validate(self, v: Any) -> Any:
        return self.cls._validate_raw(v) if v.__class__ is dict else _FAIL

    def build(self, v: Any, valid: bool = False) -> Any:
        if v.__class__ is dict:
            return self.cls._w_valid(v) if valid else self.cls._w(v)
        if v.__class__ is list:  # as the SDK's construct_type: a list of them
            w = self.cls._w
            return [w(e) if e.__class__ is dict else e for e in v]
        return v

    def dump(self, v: Any, o: "_DumpOpts") -> Any:
        if v.__class__ is dict:
            return self.cls._dump_raw(v, o)
        if v.__class__ is list:
            d = self.cls._dump_raw
            return [d(e, o) if e.__class__ is dict else _plain(e) for e in v]
        return _plain(v)


class _TaggedT(_Type):
    """A union of models told apart by a ``type`` tag (a message's tool calls);
    an untagged value is built as the first variant, as the SDK does."""

    __slots__ = ("variants", "first")

    def __init__(self, *variants: Tuple[str, Type["BaseModel"]]) -> None:
        self.variants = {tag: _ModelT(cls) for tag, cls in variants}
        self.first = self.variants[variants[0][0]]

    def _variant(self, v: Any) -> _ModelT:
        tag = v.get("type") if v.__class__ is dict else None
        return self.variants.get(tag, self.first) if tag.__class__ is str else self.first

    def validate(self, v: Any) -> Any:
        if v.__class__ is not dict:
            return _FAIL
        tag = v.get("type")
        t = self.variants.get(tag) if isinstance(tag, str) else None
        return _FAIL if t is None else t.validate(v)

    def build(self, v: Any, valid: bool = False) -> Any:
        r = self.validate(v)
        return self._variant(v).build(v, False) if r is _FAIL else self._variant(v).build(r, True)

    def dump(self, v: Any, o: "_DumpOpts") -> Any:
        r = self.validate(v)
        return self._variant(v).dump(v if r is _FAIL else r, o)


_ANY = _OptT(_Type())  # a field declared without a type: any value, None when absent
_STR, _INT, _FLOAT = _StrT(), _IntT(), _FloatT()
_OSTR, _OINT = _OptT(_STR), _OptT(_INT)


def _lit(*values: str) -> _LitT:
    return _LitT(*values)


def _opt(t: _Type) -> _OptT:
    return _OptT(t)


def _list(t: _Type) -> _ListT:
    return _ListT(t)


def _one(cls: Type["BaseModel"]) -> _OptT:
    """An optional nested object (``Optional[cls]``)."""
    return _OptT(_ModelT(cls))


def _many(cls: Type["BaseModel"]) -> _OptT:
    """An optional list of nested objects (``Optional[List[cls]]``)."""
    return _OptT(_ListT(_ModelT(cls)))


def _req(cls: Type["BaseModel"]) -> _ModelT:
    """A required nested object (constructed, never validated)."""
    return _ModelT(cls)


class _DumpOpts:
    __slots__ = ("unset", "none", "defaults", "json")

    def __init__(self, unset: bool, none: bool, defaults: bool, json: bool = False) -> None:
        self.unset = unset
        self.none = none
        self.defaults = defaults
        self.json = json


# =============================================================================
# response objects: the SDK's attribute shape over the decoded JSON
# =============================================================================

_M = TypeVar("_M", bound="BaseModel")
_T = TypeVar("_T")


class BaseModel:
    """A response object: attributes over the JSON the server sent.

    A declared field the server left out reads as ``None``; a field the
    server sent beyond the declared ones (``timings``, ``reasoning_content``)
    reads as its value; anything else raises ``AttributeError``. Nested
    objects are built on first read and kept. Values are coerced as the
    SDK's are (``Optional[int]`` fields accept ``"2"``), on read.
    """

    __slots__ = ("_raw", "__dict__")
    #: field name → its declared type (the SDK's field set, in its order)
    _fields: ClassVar[Dict[str, _Type]] = {}

    def __init__(self, **data: Any) -> None:
        _set_raw(self, {k: _dump(v) for k, v in data.items()})

    @classmethod
    def _w(cls: Type[_M], raw: Dict[str, Any]) -> _M:
        o = _new(cls)
        _set_raw(o, raw)
        return o

    @classmethod
    def _w_valid(cls: Type[_M], raw: Dict[str, Any]) -> _M:
        """An object over data that passed validation (pydantic counts its extra
        fields as set, where a constructed object does not)."""
        o = _new(cls)
        _set_raw(o, raw)
        o.__dict__[_VALID] = True
        return o

    @classmethod
    def construct(cls: Type[_M], **data: Any) -> _M:
        """``cls(**data)`` (pydantic's ``construct``/``model_construct``; nothing is validated)."""
        return cls(**data)

    model_construct = construct

    @classmethod
    def model_validate(cls: Type[_M], obj: Mapping[str, Any]) -> _M:
        """An object over a plain copy of ``obj`` (pydantic's name; the fields are not checked)."""
        return cls._w(_dump(dict(obj)))

    @classmethod
    def _validate_raw(cls, raw: Dict[str, Any]) -> Any:
        """``raw`` as pydantic's lax validation of this model leaves it (coerced;
        extra keys kept), or ``_FAIL``."""
        out = None
        for name, t in cls._fields.items():
            if name in raw:
                x = raw[name]
                r = _check(t, x)
                if r is _FAIL:
                    return _FAIL
                if r is not x:
                    if out is None:
                        out = dict(raw)
                    out[name] = r
            elif not t.optional:
                return _FAIL
        return raw if out is None else out

    @classmethod
    def _dump_raw(cls, raw: Dict[str, Any], o: _DumpOpts) -> Dict[str, Any]:
        """``model_dump`` of the object over ``raw``: every declared field (None
        when absent, unless ``exclude_unset``), then the extra ones."""
        out: Dict[str, Any] = {}
        fields = cls._fields
        for name, t in fields.items():
            x = raw.get(name, _FAIL)
            if x is _FAIL:
                if o.unset:
                    continue
                x = None
            elif x is not None:
                x = t.dump(x, o)
            if x is None and (o.none or (o.defaults and t.optional)):
                continue
            out[name] = x
        for k, x in raw.items():
            if k not in fields and not (x is None and o.none):
                out[k] = _plain(x)
        return out

    def __getattr__(self, name: str) -> Any:
        # Declared fields are properties (see _model); this serves the others.
        if name[:1] == "_":
            raise AttributeError(name)
        try:
            return self._raw[name]
        except (KeyError, TypeError):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._fields:
            object.__setattr__(self, name, value)  # the field's property
        else:
            self.__dict__[name] = value
            self._raw[name] = _dump(value)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.model_dump() == other.model_dump()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def __iter__(self) -> Iterator[Tuple[str, Any]]:
        """``(name, value)`` for every declared field, then the extra ones (as pydantic's)."""
        fields = self._fields
        for k in fields:
            yield k, getattr(self, k)
        for k in self._raw:
            if k not in fields:
                yield k, self._raw[k]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self)})"

    def __getstate__(self) -> Dict[str, Any]:
        _sync(self)
        return {"_raw": self._raw, "_valid": _VALID in self.__dict__}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        _set_raw(self, state["_raw"])
        if state.get("_valid"):
            self.__dict__[_VALID] = True

    def __copy__(self: _M) -> _M:
        _sync(self)
        o = type(self)._w(dict(self._raw))
        if _VALID in self.__dict__:
            o.__dict__[_VALID] = True
        return o

    def __deepcopy__(self: _M, memo: Dict[int, Any]) -> _M:
        _sync(self)
        o = type(self)._w(_copy.deepcopy(self._raw, memo))
        if _VALID in self.__dict__:
            o.__dict__[_VALID] = True
        return o

    @property
    def model_fields_set(self) -> set:
        """The fields the server sent, as pydantic's: the declared ones, and the
        extra ones too for an object that was validated (an optional field's)."""
        if _VALID in self.__dict__:
            return set(self._raw)
        fields = self._fields
        return {k for k in self._raw if k in fields}

    def model_dump(
        self,
        *,
        mode: str = "python",
        include: Any = None,
        exclude: Any = None,
        by_alias: Optional[bool] = None,
        exclude_unset: bool = False,
        exclude_defaults: bool = False,
        exclude_none: bool = False,
        **_: Any,
    ) -> Dict[str, Any]:
        """The data as plain dicts and lists, with the SDK's field set: every
        declared field, ``None`` when the server left it out (no field has an
        alias, so ``by_alias`` and ``mode`` change nothing)."""
        opts = _DumpOpts(exclude_unset, exclude_none, exclude_defaults, mode == "json")
        _sync(self)
        out = self._dump_raw(self._raw, opts)
        if include is not None:
            out = {k: v for k, v in out.items() if k in include}
        if exclude is not None:
            out = {k: v for k, v in out.items() if not (k in exclude and _whole(exclude, k))}
        return out

    def to_dict(
        self,
        *,
        mode: str = "python",
        use_api_names: bool = True,
        exclude_unset: bool = True,
        exclude_defaults: bool = False,
        exclude_none: bool = False,
        warnings: bool = True,
    ) -> Dict[str, Any]:
        """The SDK's ``to_dict``: by default only what the server sent."""
        return self.model_dump(
            mode=mode, exclude_unset=exclude_unset, exclude_defaults=exclude_defaults, exclude_none=exclude_none
        )

    def model_dump_json(self, *, indent: Optional[int] = None, **kw: Any) -> str:
        """:meth:`model_dump` as JSON (compact unless ``indent``)."""
        kw.pop("ensure_ascii", None)
        kw["mode"] = "json"
        d = self.model_dump(**kw)
        if indent is None:
            return json.dumps(d, ensure_ascii=False, separators=(",", ":"))
        return json.dumps(d, indent=indent, ensure_ascii=False)

    def to_json(
        self,
        *,
        indent: Optional[int] = 2,
        use_api_names: bool = True,
        exclude_unset: bool = True,
        exclude_defaults: bool = False,
        exclude_none: bool = False,
        warnings: bool = True,
    ) -> str:
        """The SDK's ``to_json``: by default only what the server sent, indented by 2."""
        return self.model_dump_json(
            indent=indent, exclude_unset=exclude_unset, exclude_defaults=exclude_defaults, exclude_none=exclude_none
        )


def _whole(exclude: Any, k: str) -> bool:
    """An ``exclude`` entry that drops the whole field (a set member, or ``True`` in a dict)."""
    return not isinstance(exclude, dict) or exclude[k] is True or exclude[k] is ...


def _dump(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return v._raw
    if isinstance(v, list):
        return [_dump(x) for x in v]
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    return v


def _plain(v: Any) -> Any:
    """A deep copy of plain JSON data."""
    if v.__class__ is dict:
        return {k: _plain(x) for k, x in v.items()}
    if v.__class__ is list:
        return [_plain(x) for x in v]
    return v


def _sync(o: BaseModel) -> None:
    """Write what was read (and cached) back into the data, so an edit made
    through an attribute (``msg.tool_calls.pop()``, ``c.choices.append(x)``,
    an assigned list grown in place) is in every dump, as with the SDK's
    objects. Only fields read so far are cached, so a dump of an object whose
    fields were never read costs nothing here."""
    cache = o.__dict__
    if not cache:
        return
    raw = o._raw
    fields = o._fields
    for k, v in cache.items():
        if k == _VALID or (k not in fields and k not in raw):
            continue
        if fields.get(k) is _KEPT:
            continue  # parse()'s object: the data holds it as _Kept already
        if v is None and k not in raw:
            continue  # an absent field read as None stays absent (unset)
        raw[k] = _synced(v)


def _synced(v: Any) -> Any:
    """``v`` as data, after syncing the objects inside it."""
    if isinstance(v, BaseModel):
        _sync(v)
        return v._raw
    if v.__class__ is list:
        return [_synced(x) for x in v]
    if v.__class__ is dict:
        return {k: _synced(x) for k, x in v.items()}
    return v


_new = object.__new__
_set_raw = BaseModel._raw.__set__  # type: ignore[attr-defined] # the slot, bypassing __setattr__
_MISSING = object()


def _plain_field(name: str) -> property:
    """A field whose value is read as sent (str, literal, required int, untyped)."""

    def fget(self: BaseModel) -> Any:
        return self._raw.get(name)

    def fset(self: BaseModel, value: Any) -> None:
        self._raw[name] = _dump(value)

    return property(fget, fset)


def _int_field(name: str) -> property:
    """An ``Optional[int]`` field: coerced on read ("2" -> 2), else as sent."""

    def fget(self: BaseModel) -> Any:
        v = self._raw.get(name)
        if v is None or v.__class__ is int:
            return v
        r = _lax_int(v)
        return v if r is _FAIL else r

    def fset(self: BaseModel, value: Any) -> None:
        self._raw[name] = _dump(value)

    return property(fget, fset)


def _object_field(name: str, t: _Type) -> property:
    """Any other field: built on first read and kept. An optional field's
    value is validated first, and a coerced copy replaces the raw value (so
    a later assignment inside it is seen by the dumps)."""
    inner = t.t if isinstance(t, _OptT) else None

    def fget(self: BaseModel) -> Any:
        cache = self.__dict__
        v = cache.get(name, _MISSING)
        if v is _MISSING:
            raw = self._raw
            v = raw.get(name)
            if v is not None:
                if inner is not None:
                    r = inner.validate(v)
                    if r is _FAIL:
                        v = inner.build(v, False)
                    else:
                        if r is not v:
                            raw[name] = r
                        v = inner.build(r, True)
                else:
                    v = t.build(v, _VALID in cache)
            cache[name] = v
        return v

    def fset(self: BaseModel, value: Any) -> None:
        self._raw[name] = _dump(value)
        self.__dict__[name] = value

    return property(fget, fset)


_PLAIN_TYPES = (_StrT, _LitT, _IntT)


def _field(name: str, t: _Type) -> property:
    if isinstance(t, _OptT):
        inner = t.t
        if inner is _INT:
            return _int_field(name)
        if isinstance(inner, (_StrT, _LitT)) or inner.__class__ is _Type:
            return _plain_field(name)  # validation leaves a value as it is
        return _object_field(name, t)
    if isinstance(t, _PLAIN_TYPES) or t.__class__ is _Type:
        return _plain_field(name)
    return _object_field(name, t)


def _model(name: str, fields: Dict[str, Optional[_Type]], doc: str = "") -> Type[BaseModel]:
    """A response class: one property per declared field (absent: ``None``);
    nested objects are built on first read and kept. A field's type is
    ``None`` (any value), or one of ``_STR``, ``_INT``, ``_FLOAT``, ``_lit(…)``,
    ``_opt(…)``, ``_list(…)``, ``_req(cls)``, ``_one(cls)``, ``_many(cls)``."""
    types: Dict[str, _Type] = {k: (_ANY if t is None else t) for k, t in fields.items()}
    ns: Dict[str, Any] = {"__slots__": (), "_fields": types, "__doc__": doc, "__module__": __name__}
    for fname, t in types.items():
        ns[fname] = _field(fname, t)
    return type(name, (BaseModel,), ns)  # type: ignore[return-value]


# The declared types below follow the SDK's (openai.types): the field set and
# order, which fields are required, and their scalar types.

# -- shared --------------------------------------------------------------------
PromptTokensDetails = _model(
    "PromptTokensDetails",
    dict.fromkeys(("audio_tokens", "cache_write_tokens", "cached_tokens", "image_tokens", "text_tokens"), _OINT),
)
CompletionTokensDetails = _model(
    "CompletionTokensDetails",
    dict.fromkeys(
        (
            "accepted_prediction_tokens",
            "audio_tokens",
            "reasoning_tokens",
            "rejected_prediction_tokens",
            "text_tokens",
        ),
        _OINT,
    ),
)
CompletionUsage = _model(
    "CompletionUsage",
    {
        "completion_tokens": _INT,
        "prompt_tokens": _INT,
        "total_tokens": _INT,
        "completion_tokens_details": _one(CompletionTokensDetails),
        "prompt_tokens_details": _one(PromptTokensDetails),
    },
    "Token counts: ``prompt_tokens``, ``completion_tokens``, ``total_tokens``.",
)
_BYTES = _opt(_list(_INT))
TopLogprob = _model("TopLogprob", {"token": _STR, "bytes": _BYTES, "logprob": _FLOAT})
ChatCompletionTokenLogprob = _model(
    "ChatCompletionTokenLogprob",
    {"token": _STR, "bytes": _BYTES, "logprob": _FLOAT, "top_logprobs": _list(_req(TopLogprob))},
)
ChoiceLogprobs = _model(
    "ChoiceLogprobs",
    {"content": _many(ChatCompletionTokenLogprob), "refusal": _many(ChatCompletionTokenLogprob)},
)
_FINISH = ("stop", "length", "tool_calls", "content_filter", "function_call")
_SERVICE_TIER = _opt(_lit("auto", "default", "flex", "scale", "priority", "fast"))

# -- chat.completion -------------------------------------------------------------
Function = _model("Function", {"arguments": _STR, "name": _STR})
ChatCompletionAudio = _model(
    "ChatCompletionAudio", {"id": _STR, "data": _STR, "expires_at": _INT, "transcript": _STR}
)
AnnotationURLCitation = _model(
    "AnnotationURLCitation", {"end_index": _INT, "start_index": _INT, "title": _STR, "url": _STR}
)
Annotation = _model("Annotation", {"type": _lit("url_citation"), "url_citation": _req(AnnotationURLCitation)})
FunctionCall = _model("FunctionCall", {"arguments": _STR, "name": _STR})
ChatCompletionMessageToolCall = _model(
    "ChatCompletionMessageFunctionToolCall", {"id": _STR, "function": _req(Function), "type": _lit("function")}
)
ChatCompletionMessageFunctionToolCall = ChatCompletionMessageToolCall
Custom = _model("Custom", {"input": _STR, "name": _STR})
ChatCompletionMessageCustomToolCall = _model(
    "ChatCompletionMessageCustomToolCall", {"id": _STR, "custom": _req(Custom), "type": _lit("custom")}
)
ChatCompletionMessage = _model(
    "ChatCompletionMessage",
    {
        "content": _OSTR,
        "refusal": _OSTR,
        "role": _lit("assistant"),
        "annotations": _many(Annotation),
        "audio": _one(ChatCompletionAudio),
        "function_call": _one(FunctionCall),
        "tool_calls": _opt(
            _list(
                _TaggedT(
                    ("function", ChatCompletionMessageFunctionToolCall),
                    ("custom", ChatCompletionMessageCustomToolCall),
                )
            )
        ),
    },
    "The assistant's message: ``content``, ``tool_calls``, ``role`` (and llama-server's ``reasoning_content``).",
)
Choice = _model(
    "Choice",
    {
        "finish_reason": _lit(*_FINISH),
        "index": _INT,
        "logprobs": _one(ChoiceLogprobs),
        "message": _req(ChatCompletionMessage),
    },
)
ChatCompletion = _model(
    "ChatCompletion",
    {
        "id": _STR,
        "choices": _list(_req(Choice)),
        "created": _INT,
        "model": _STR,
        "object": _lit("chat.completion"),
        "metadata": _opt(_DictT(_STR)),
        "moderation": None,  # OpenAI's own; kept as the data sent
        "service_tier": _SERVICE_TIER,
        "system_fingerprint": _OSTR,
        "usage": _one(CompletionUsage),
    },
    "A whole chat completion (``chat.completion``).",
)

# -- chat.completion.chunk ----------------------------------------------------------
ChoiceDeltaToolCallFunction = _model("ChoiceDeltaToolCallFunction", {"arguments": _OSTR, "name": _OSTR})
ChoiceDeltaToolCall = _model(
    "ChoiceDeltaToolCall",
    {"index": _INT, "id": _OSTR, "function": _one(ChoiceDeltaToolCallFunction), "type": _opt(_lit("function"))},
)
ChoiceDeltaFunctionCall = _model("ChoiceDeltaFunctionCall", {"arguments": _OSTR, "name": _OSTR})
ChoiceDeltaAudio = _model(
    "ChoiceDeltaAudio", {"id": _OSTR, "data": _OSTR, "expires_at": _OINT, "transcript": _OSTR}
)
ChoiceDelta = _model(
    "ChoiceDelta",
    {
        "audio": _one(ChoiceDeltaAudio),
        "content": _OSTR,
        "function_call": _one(ChoiceDeltaFunctionCall),
        "refusal": _OSTR,
        "role": _opt(_lit("developer", "system", "user", "assistant", "tool")),
        "tool_calls": _many(ChoiceDeltaToolCall),
    },
    "One streamed piece: ``content``, ``role``, ``tool_calls`` fragments (and ``reasoning_content``).",
)
ChunkChoice = _model(
    "Choice",
    {
        "delta": _req(ChoiceDelta),
        "index": _INT,
        "finish_reason": _opt(_lit(*_FINISH)),
        "logprobs": _one(ChoiceLogprobs),
    },
)
ChatCompletionChunk = _model(
    "ChatCompletionChunk",
    {
        "id": _STR,
        "choices": _list(_req(ChunkChoice)),
        "created": _INT,
        "model": _STR,
        "object": _lit("chat.completion.chunk"),
        "moderation": None,  # OpenAI's own; kept as the data sent
        "obfuscation": _OSTR,
        "service_tier": _SERVICE_TIER,
        "system_fingerprint": _OSTR,
        "usage": _one(CompletionUsage),
    },
    "One streamed chunk (``chat.completion.chunk``).",
)

# -- text_completion ------------------------------------------------------------------
Logprobs = _model(
    "Logprobs",
    {
        "text_offset": _opt(_list(_INT)),
        "token_logprobs": _opt(_list(_FLOAT)),
        "tokens": _opt(_list(_STR)),
        "top_logprobs": _opt(_list(_DictT(_FLOAT))),
    },
)
CompletionChoice = _model(
    "CompletionChoice",
    {
        "finish_reason": _lit("stop", "length", "content_filter"),
        "index": _INT,
        "logprobs": _one(Logprobs),
        "text": _STR,
    },
)
Completion = _model(
    "Completion",
    {
        "id": _STR,
        "choices": _list(_req(CompletionChoice)),
        "created": _INT,
        "model": _STR,
        "object": _lit("text_completion"),
        "system_fingerprint": _OSTR,
        "usage": _one(CompletionUsage),
    },
    "A ``/v1/completions`` answer or streamed chunk (``text_completion``).",
)

# -- models -----------------------------------------------------------------------------
Model = _model(
    "Model", {"id": _STR, "created": _INT, "object": _lit("model"), "owned_by": _STR, "shutdown_date": _OSTR}
)


class SyncPage:
    """``models.list()``'s page: ``.data`` and iteration over :class:`Model`."""

    def __init__(self, data: List[Any], obj: str = "list") -> None:
        self.data = data
        self.object = obj

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def has_next_page(self) -> bool:
        """Always False: ``/models`` is one page (as in the SDK)."""
        return False

    def next_page_info(self) -> None:
        """There is never a next page (the SDK's answer for ``/models`` too)."""
        return None

    def iter_pages(self) -> Iterator["SyncPage"]:
        """This page only (the SDK's ``iter_pages``)."""
        yield self

    def model_dump(self, **kw: Any) -> Dict[str, Any]:
        """``{"data": [...], "object": ...}``, each item dumped as its own
        ``model_dump(**kw)`` does (the SDK's field set)."""
        data = [m.model_dump(**kw) if isinstance(m, BaseModel) else _plain(m) for m in self.data]
        return {"data": data, "object": self.object}

    def to_dict(self, **kw: Any) -> Dict[str, Any]:
        """The SDK's ``to_dict``: each item's :meth:`BaseModel.to_dict`."""
        data = [m.to_dict(**kw) if isinstance(m, BaseModel) else _plain(m) for m in self.data]
        return {"data": data, "object": self.object}

    def model_dump_json(self, *, indent: Optional[int] = None, **kw: Any) -> str:
        """:meth:`model_dump` in JSON mode as a string (compact without ``indent``, as pydantic)."""
        kw["mode"] = "json"
        d = self.model_dump(**kw)
        if indent is None:
            return json.dumps(d, ensure_ascii=False, separators=(",", ":"))
        return json.dumps(d, indent=indent, ensure_ascii=False)

    def to_json(self, *, indent: Optional[int] = 2, **kw: Any) -> str:
        """The SDK's ``to_json``: :meth:`to_dict` in JSON mode, indented 2 by default."""
        kw["mode"] = "json"
        return json.dumps(self.to_dict(**kw), indent=indent, ensure_ascii=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data={self.data!r})"


# =============================================================================
# the rest of the SDK surface: Omit, Timeout, embeddings, parsed completions, async pages
# =============================================================================


class Omit:
    """The SDK's ``omit``: a value that is not sent (like ``NOT_GIVEN``)."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "omit"


omit = Omit()
#: The SDK's newer name for ``NOT_GIVEN`` (the same sentinel here).
not_given = NOT_GIVEN


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


_UNSET: Any = _Unset()


class Timeout:
    """The SDK's ``Timeout`` (httpx's): ``Timeout(600.0, connect=5.0)``,
    ``Timeout(None)``, ``Timeout(connect=…, read=…, write=…, pool=…)`` or a
    ``(connect, read, write, pool)`` tuple. The client uses ``connect`` (to
    connect) and ``read`` (the longest wait for a byte); ``write`` and
    ``pool`` are kept for equality and repr."""

    connect: Optional[float]
    read: Optional[float]
    write: Optional[float]
    pool: Optional[float]

    def __init__(
        self,
        timeout: Any = _UNSET,
        *,
        connect: Any = _UNSET,
        read: Any = _UNSET,
        write: Any = _UNSET,
        pool: Any = _UNSET,
    ) -> None:
        if isinstance(timeout, Timeout):
            if any(v is not _UNSET for v in (connect, read, write, pool)):
                raise ValueError("Timeout(Timeout(...)) takes no other argument")
            self.connect, self.read, self.write, self.pool = timeout.connect, timeout.read, timeout.write, timeout.pool
        elif isinstance(timeout, tuple):
            self.connect, self.read = timeout[0], timeout[1]
            self.write = timeout[2] if len(timeout) > 2 else None
            self.pool = timeout[3] if len(timeout) > 3 else None
        elif all(v is not _UNSET for v in (connect, read, write, pool)):
            self.connect, self.read, self.write, self.pool = connect, read, write, pool
        else:
            if timeout is _UNSET:
                raise ValueError("Timeout must either include a default, or set all four parameters explicitly.")
            self.connect = timeout if connect is _UNSET else connect
            self.read = timeout if read is _UNSET else read
            self.write = timeout if write is _UNSET else write
            self.pool = timeout if pool is _UNSET else pool

    def as_dict(self) -> Dict[str, Optional[float]]:
        """``{"connect", "read", "write", "pool"}`` in seconds (None: no limit), as httpx's ``Timeout.as_dict``."""
        return {"connect": self.connect, "read": self.read, "write": self.write, "pool": self.pool}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Timeout):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if len({self.connect, self.read, self.write, self.pool}) == 1:
            return f"Timeout(timeout={self.connect})"
        return f"Timeout(connect={self.connect}, read={self.read}, write={self.write}, pool={self.pool})"


#: The SDK's default: 600 s without a byte, 5 s to connect.
DEFAULT_TIMEOUT = Timeout(timeout=600, connect=5.0)

# -- embeddings ----------------------------------------------------------------------
Embedding = _model(
    "Embedding",
    {"embedding": _list(_FLOAT), "index": _INT, "object": _lit("embedding")},
    "One input's vector: ``embedding`` (floats, or the base64 string asked for), ``index``.",
)
# openai.types.create_embedding_response.Usage (both counts required)
Usage = _model("Usage", {"prompt_tokens": _INT, "total_tokens": _INT})
CreateEmbeddingResponse = _model(
    "CreateEmbeddingResponse",
    {"data": _list(_req(Embedding)), "model": _STR, "object": _lit("list"), "usage": _req(Usage)},
    "``embeddings.create``'s answer: ``data`` (one :class:`Embedding` per input), ``model``, ``usage``.",
)

# -- chat.completions.parse ----------------------------------------------------------------


class _Kept:
    """An object the client made (``parse()``'s pydantic instance) held in the
    data; its dumps are its own ``model_dump`` with the same options, as
    pydantic dumps a nested model (``exclude_none`` reaches inside it)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_Kept":
        return _Kept(_copy.deepcopy(self.obj, memo))


class _KeptT(_Type):
    """A field the client sets (``parsed``, ``parsed_arguments``): the attribute
    is the object itself, the dumps its dump (a plain value is kept as it is)."""

    __slots__ = ()

    def build(self, v: Any, valid: bool = False) -> Any:
        return v.obj if v.__class__ is _Kept else v

    def dump(self, v: Any, o: "_DumpOpts") -> Any:
        if v.__class__ is _Kept:
            return v.obj.model_dump(
                mode="json" if o.json else "python",
                exclude_unset=o.unset,
                exclude_none=o.none,
                exclude_defaults=o.defaults,
            )
        return _plain(v)


_KEPT = _OptT(_KeptT())


# ``parsed`` / ``parsed_arguments``: the data is the JSON form (what model_dump()
# gives); the attribute is the object parse() made, kept in the field's cache.
ParsedFunction = _model(
    "ParsedFunction",
    dict(Function._fields, parsed_arguments=_KEPT),
    "A tool call's function with ``parsed_arguments`` (a strict tool's arguments, decoded).",
)
ParsedFunctionToolCall = _model(
    "ParsedFunctionToolCall", dict(ChatCompletionMessageToolCall._fields, function=_req(ParsedFunction))
)
ParsedChatCompletionMessage = _model(
    "ParsedChatCompletionMessage",
    dict(ChatCompletionMessage._fields, tool_calls=_many(ParsedFunctionToolCall), parsed=_KEPT),
    "The assistant's message with ``parsed``: the content validated by the ``response_format`` class.",
)
ParsedChoice = _model("ParsedChoice", dict(Choice._fields, message=_one(ParsedChatCompletionMessage)))
ParsedChatCompletion = _model(
    "ParsedChatCompletion",
    dict(ChatCompletion._fields, choices=_many(ParsedChoice)),
    "``chat.completions.parse``'s answer: a :class:`ChatCompletion` whose messages have ``parsed``.",
)


class AsyncPage(SyncPage):
    """:class:`AsyncOpenAI`'s ``models.list()`` page: ``.data``, ``for`` and ``async for``."""

    async def __aiter__(self) -> Any:  # an async generator
        for item in self.data:
            yield item
