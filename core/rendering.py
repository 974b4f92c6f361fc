"""Rendering message templates: pure functions, no I/O.

Template format (documented in templates/README.md):
- Email (`*.html`): a Jinja2 template with three blocks, `subject`, `preheader`
  (optional) and `html`. Subject and preheader are plain text (whitespace collapsed).
- SMS (`*.txt`, by convention `*.sms.txt`): the whole file is the message text.

Templates run in Jinja2's `SandboxedEnvironment` (a template that reaches for Python
internals raises `SecurityError`), HTML is autoescaped, and undefined names fail
(`StrictUndefined`) unless given a `| default(...)`. Context: `customer` (id, email,
phone, first_name and every attribute), `name` (first name or "there"), `journey`,
`step`, `unsubscribe_url`.

`prove_template` renders a template for sample customers before it is saved or a journey
using it is activated (see its docstring for the rule on attributes).

This module lives in core because the API validates and previews templates and the
messaging activity renders them; neither may import the other.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from html.parser import HTMLParser
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

EMAIL_BLOCKS = ("subject", "preheader", "html")
REQUIRED_EMAIL_BLOCKS = ("subject", "html")


class TemplateProblem(Exception):
    """A template that cannot be saved or rendered; `line` is 1-based when known.

    `kind` says what went wrong: `syntax` (it does not compile, or names an unknown
    filter or test), `structure` (a required block is missing), `undefined` (it reads a
    name the context does not hold), `render` (another error while rendering, such as
    dividing by zero) or `security` (it reached for Python internals).
    """

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        security: bool = False,
        kind: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.line = line
        self.security = security
        self.kind = kind or ("security" if security else "syntax" if line else "structure")

    @property
    def code(self) -> str:
        """The API error code: `template_syntax`, `template_undefined`, ..."""
        return {
            "syntax": "template_syntax",
            "structure": "invalid",
            "undefined": "template_undefined",
            "render": "template_render_failed",
            "security": "template_unsafe",
        }.get(self.kind, "invalid")


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    preheader: str
    html: str
    text: str
    links: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RenderedSms:
    body: str
    encoding: str  # "GSM-7" | "UCS-2"
    segments: int


_html_env = SandboxedEnvironment(autoescape=True, undefined=StrictUndefined)
_text_env = SandboxedEnvironment(autoescape=False, undefined=StrictUndefined)


def is_email_template(path: str) -> bool:
    return path.endswith(".html")


def _env_for(path: str) -> SandboxedEnvironment:
    return _html_env if is_email_template(path) else _text_env


def validate_template(source: str, *, path: str) -> None:
    """Raise TemplateProblem (naming the line) when `source` does not compile: a syntax
    error, an unknown filter or test (even one inside an `{% if %}`, which Jinja would
    only notice when a send reaches it), or an email without its required blocks."""
    parsed = _parsed(source, _env_for(path))
    if is_email_template(path):
        names = {block.name for block in parsed.find_all(nodes.Block)}
        missing = [name for name in REQUIRED_EMAIL_BLOCKS if name not in names]
        if missing:
            raise TemplateProblem(
                "an email template needs {% block subject %} and {% block html %}; missing: "
                + ", ".join(missing)
            )
    try:
        _compiled(source, is_email_template(path))
    except TemplateSyntaxError as exc:
        raise TemplateProblem(f"line {exc.lineno}: {exc.message}", line=exc.lineno) from exc


def _parsed(source: str, env: SandboxedEnvironment) -> nodes.Template:
    """The template's syntax tree; TemplateProblem for a syntax error or an unknown filter
    or test (even one inside an `{% if %}`, which Jinja would only notice when run)."""
    try:
        parsed = env.parse(source)
    except TemplateSyntaxError as exc:
        raise TemplateProblem(f"line {exc.lineno}: {exc.message}", line=exc.lineno) from exc
    for node in parsed.find_all((nodes.Filter, nodes.Test)):
        is_filter = isinstance(node, nodes.Filter)
        known = env.filters if is_filter else env.tests
        if node.name not in known:
            what = "filter" if is_filter else "test"
            raise TemplateProblem(
                f"line {node.lineno}: no {what} named {node.name!r}", line=node.lineno
            )
    return parsed


def customer_context(
    *, customer_id: str, email: str | None, phone: str | None, attributes: Mapping[str, Any]
) -> dict[str, Any]:
    """The `customer` a template sees: attributes plus id, email, phone and first_name.

    Empty values are left out so that `| default(...)` applies to them.
    """
    customer: dict[str, Any] = {
        key: value for key, value in attributes.items() if value not in (None, "")
    }
    customer.update({"id": customer_id, "email": email, "phone": phone})
    if "first_name" not in customer:
        for key in _FIRST_NAME_SOURCES:
            value = customer.get(key)
            if isinstance(value, str) and value.strip():
                customer["first_name"] = value.strip().split()[0]
                break
    return {key: value for key, value in customer.items() if value not in (None, "")}


_FIRST_NAME_SOURCES = ("firstName", "given_name", "name", "full_name")
ABSENT: Any = object()
"""What `customer_field` answers for a name the customer's context would not hold."""


def customer_field(
    name: str,
    *,
    customer_id: str,
    email: str | None,
    phone: str | None,
    attributes: Mapping[str, Any],
) -> Any:
    """`customer_context(...)[name]` without building the context (ABSENT when it would
    not hold `name`): what a slot remembered by its values is keyed on."""
    if name == "id":
        return customer_id
    if name in ("email", "phone"):
        value = email if name == "email" else phone
        return ABSENT if value in (None, "") else value
    value = attributes.get(name)
    if value not in (None, ""):
        return value
    if name == "first_name":
        for key in _FIRST_NAME_SOURCES:
            source = attributes.get(key)
            if isinstance(source, str) and source.strip():
                return source.strip().split()[0]
    return ABSENT


def template_context(
    customer: Mapping[str, Any],
    *,
    journey: str | None = None,
    step: str | None = None,
    unsubscribe_url: str = "",
) -> dict[str, Any]:
    """Every name a template may use."""
    context: dict[str, Any] = {
        "customer": dict(customer),
        "name": customer.get("first_name") or "there",
        "unsubscribe_url": unsubscribe_url,
    }
    if journey:
        context["journey"] = journey
    if step:
        context["step"] = step
    return context


@lru_cache(maxsize=512)
def _compiled(source: str, html: bool) -> Template:
    # Compiling costs ~10 ms; a template's source is its cache key, so an edited
    # template compiles afresh. Compiled templates are safe to share between threads.
    return (_html_env if html else _text_env).from_string(source)


def _render_block(template: Any, name: str, context: dict[str, Any]) -> str:
    block = template.blocks.get(name)
    if block is None:
        return ""
    return "".join(block(template.new_context(context)))


def _template_line(exc: BaseException) -> int | None:
    """The template line the innermost template frame of `exc` was running, or None when
    the error did not come from template code."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        namespace = tb.tb_frame.f_globals
        template = namespace.get("__jinja_template__")
        if template is not None:
            # A block rendered on its own: Python lines of the compiled module.
            line = template.get_corresponding_lineno(tb.tb_lineno)
        elif "__jinja_exception__" in namespace:
            # A whole render: Jinja rewrote the traceback to template lines.
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _located(message: str, line: int | None) -> str:
    return f"line {line}: {message}" if line else message


def _run(render: Callable[[], Any]) -> Any:
    try:
        return render()
    except SecurityError as exc:
        line = _template_line(exc)
        raise TemplateProblem(
            _located(f"unsafe template: {exc}", line), line=line, security=True
        ) from exc
    except TemplateSyntaxError as exc:
        raise TemplateProblem(f"line {exc.lineno}: {exc.message}", line=exc.lineno) from exc
    except UndefinedError as exc:
        line = _template_line(exc)
        raise TemplateProblem(
            _located(_undefined_message(str(exc)), line), line=line, kind="undefined"
        ) from exc
    except Exception as exc:
        # The template's own mistakes (1 / 0, calling a number, a filter given the wrong
        # type) fail every send alike: report them with their line. Anything raised
        # outside template code is not the template's fault and goes on up.
        line = _template_line(exc)
        if line is None:
            raise
        raise TemplateProblem(
            f"line {line}: {type(exc).__name__}: {exc}", line=line, kind="render"
        ) from exc


_UNDEFINED_ATTRIBUTE = re.compile(r"^'dict object' has no (?:attribute|element) '(?P<name>.+)'$")
_UNDEFINED_NAME = re.compile(r"^'(?P<name>.+)' is undefined$")


def _undefined_message(jinja_message: str) -> str:
    """Jinja's "'dict object' has no attribute 'city'" in words a marketer can act on."""
    match = _UNDEFINED_ATTRIBUTE.match(jinja_message) or _UNDEFINED_NAME.match(jinja_message)
    if match is None:
        return jinja_message
    return (
        f"`{match.group('name')}` is undefined: add `| default(...)` or test it with `is defined`"
    )


def _plain_line(text: str) -> str:
    return " ".join(html.unescape(text).split())


def render_email(
    source: str,
    context: dict[str, Any],
    *,
    track_link: Callable[[str], str] | None = None,
) -> RenderedEmail:
    """Render an email template: subject, preheader, HTML (links tracked) and a text part.

    `track_link(url)` returns the tracked URL for a link target; links to the
    unsubscribe URL are left alone. A footer with the unsubscribe link is added when
    the template has none.
    """

    def render() -> RenderedEmail:
        template = _compiled(source, True)
        subject = _plain_line(_render_block(template, "subject", context))
        preheader = _plain_line(_render_block(template, "preheader", context))
        body = _render_block(template, "html", context)
        return _finish_email(subject, preheader, body, context, track_link)

    return _run(render)


def _finish_email(
    subject: str,
    preheader: str,
    body: str,
    context: dict[str, Any],
    track_link: Callable[[str], str] | None,
) -> RenderedEmail:
    unsubscribe_url = str(context.get("unsubscribe_url") or "")
    if unsubscribe_url and html.escape(unsubscribe_url) not in body and unsubscribe_url not in body:
        body = _insert_before_body_end(body, _unsubscribe_footer(unsubscribe_url))
    if preheader:
        body = _insert_after_body_start(body, _hidden_preheader(preheader))
    targets: list[str] = []
    if track_link is not None:
        body, targets = rewrite_links(body, track_link, keep={unsubscribe_url})
    else:
        targets = [target for target in link_targets(body) if target != unsubscribe_url]
    return RenderedEmail(
        subject=subject, preheader=preheader, html=body, text=html_to_text(body), links=targets
    )


def render_sms(source: str, context: dict[str, Any]) -> RenderedSms:
    """Render an SMS template and count its segments."""

    def render() -> RenderedSms:
        body = _compiled(source, False).render(context).strip()
        encoding, segments = sms_segments(body)
        return RenderedSms(body=body, encoding=encoding, segments=segments)

    return _run(render)


# --- proving a template before it is used ---------------------------------------------

SAMPLE_CUSTOMER_ID = "sample-customer"
SAMPLE_EMAIL = "sample@example.com"
SAMPLE_PHONE = "+15555550100"
SAMPLE_UNSUBSCRIBE_URL = "https://journeys.invalid/u/sample"


def prove_template(
    source: str,
    *,
    path: str,
    known_attributes: Mapping[str, Any] | None = None,
    journey: str = "sample-journey",
    step: str = "sample-step",
) -> None:
    """Raise TemplateProblem (naming the line) unless `source` compiles and renders, in
    the environment and with the context the send path uses, for two sample customers:

    1. a customer with no attributes, only an id and the address its channel needs
       (email for `.html`, phone for `.txt`): every attribute read must be guarded by
       `| default(...)` or `is defined`, as customers differ in what they hold;
    2. a customer with both addresses and `known_attributes` (the attributes the caller
       knows customers to hold, with real values), so the guarded parts render too.
    """
    validate_template(source, path=path)
    email = is_email_template(path)
    bare = customer_context(
        customer_id=SAMPLE_CUSTOMER_ID,
        email=SAMPLE_EMAIL if email else None,
        phone=None if email else SAMPLE_PHONE,
        attributes={},
    )
    full = customer_context(
        customer_id=SAMPLE_CUSTOMER_ID,
        email=SAMPLE_EMAIL,
        phone=SAMPLE_PHONE,
        attributes=known_attributes or {},
    )
    for customer, who in (
        (bare, "a customer without attributes"),
        (full, "a customer with every known attribute"),
    ):
        context = template_context(
            customer, journey=journey, step=step, unsubscribe_url=SAMPLE_UNSUBSCRIBE_URL
        )
        try:
            if email:
                render_email(source, context, track_link=lambda url: url)
            else:
                render_sms(source, context)
        except TemplateProblem as exc:
            raise TemplateProblem(
                f"{exc.message} (rendering for {who})",
                line=exc.line,
                security=exc.security,
                kind=exc.kind,
            ) from exc


# --- personalisation slots -------------------------------------------------------------
# A slot (banner, top bar, ...) is an HTML fragment a storefront puts in its page: the
# template's own markup stays, every value it prints is escaped (autoescape), so a
# customer attribute holding `<script>` shows as text.

SAMPLE_CAMPAIGN = "sample-campaign"
SAMPLE_EXPERIENCE = "sample-experience"


SLOT_MEMO_SIZE = 4_096


@dataclass(frozen=True)
class SlotTemplate:
    """A compiled slot. `constant` holds its text when it reads nothing from its context,
    so that it is rendered once rather than on every decision; `reads` names the
    customer attributes it reads when nothing else of the customer reaches it, so that
    its text is remembered by those values (a top bar greeting by first name renders
    once per name, not once per page view)."""

    source: str
    template: Template
    constant: str | None
    reads: tuple[str, ...] | None = None
    memo: dict[Any, str] = field(default_factory=dict, compare=False, repr=False)


_SLOT_NAMES = {"customer", "name", "campaign", "experience"}


def _customer_reads(parsed: nodes.Template) -> tuple[str, ...] | None:
    """The attributes a slot reads as `customer.x` or `customer["x"]` (and `name`, which
    is the first name), or None when `customer` reaches it any other way (whole, through
    a variable, by a computed key) and its text may depend on anything."""
    if meta.find_undeclared_variables(parsed) - _SLOT_NAMES:
        return None
    reads: set[str] = set()
    covered = 0
    for node in parsed.find_all((nodes.Getattr, nodes.Getitem)):
        target = node.node
        if not (isinstance(target, nodes.Name) and target.name == "customer"):
            continue
        if isinstance(node, nodes.Getattr):
            reads.add(node.attr)
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            reads.add(node.arg.value)
        else:
            return None
        covered += 1
    uses = sum(1 for n in parsed.find_all(nodes.Name) if n.name == "customer")
    if uses != covered:
        return None
    if any(n.name == "name" for n in parsed.find_all(nodes.Name)):
        reads.add("first_name")
    return tuple(sorted(reads))


def slot_context(customer: Mapping[str, Any], *, campaign: str, experience: str) -> dict[str, Any]:
    """Every name a slot may use: `customer`, `name`, `campaign`, `experience`."""
    return {
        "customer": dict(customer),
        "name": customer.get("first_name") or "there",
        "campaign": campaign,
        "experience": experience,
    }


def compile_slot(source: str) -> SlotTemplate:
    """The compiled slot; TemplateProblem (naming the line) when it does not compile."""
    parsed = _parsed(source, _html_env)
    try:
        template = _compiled(source, True)
    except TemplateSyntaxError as exc:
        raise TemplateProblem(f"line {exc.lineno}: {exc.message}", line=exc.lineno) from exc
    constant = None
    if not meta.find_undeclared_variables(parsed):
        constant = _run(lambda: str(template.render()).strip())
    return SlotTemplate(
        source=source, template=template, constant=constant, reads=_customer_reads(parsed)
    )


def render_slot(slot: SlotTemplate, context: dict[str, Any]) -> str:
    """The slot's text for this context (surrounding whitespace removed)."""
    customer = context["customer"]
    return render_slot_lazily(
        slot,
        experience=context.get("experience"),
        field=lambda name: customer.get(name, ABSENT),
        context=lambda: context,
    )


def render_slot_lazily(
    slot: SlotTemplate,
    *,
    experience: str | None,
    field: Callable[[str], Any],
    context: Callable[[], dict[str, Any]],
) -> str:
    """`render_slot`, asking for the context only when the slot must really be rendered:
    a constant slot, or one remembered for these values (`field(name)`, as
    `customer_field` gives them), needs none."""
    if slot.constant is not None:
        return slot.constant
    if slot.reads is None:
        return _run(lambda: str(slot.template.render(context())).strip())
    key = (experience, *(field(name) for name in slot.reads))
    try:
        return slot.memo[key]
    except KeyError:
        pass
    except TypeError:  # a value that cannot be a key (a list, an object): render it
        return _run(lambda: str(slot.template.render(context())).strip())
    text = _run(lambda: str(slot.template.render(context())).strip())
    if len(slot.memo) >= SLOT_MEMO_SIZE:
        slot.memo.clear()
    slot.memo[key] = text
    return text


def prove_slot(source: str, *, known_attributes: Mapping[str, Any] | None = None) -> None:
    """Raise TemplateProblem (naming the line) unless the slot compiles and renders, in
    the decision's sandbox and context, for a customer with no attributes (every
    attribute read must be guarded by `| default(...)` or `is defined`) and for one with
    `known_attributes` (as `prove_template` does for messages)."""
    slot = compile_slot(source)
    bare = customer_context(customer_id=SAMPLE_CUSTOMER_ID, email=None, phone=None, attributes={})
    full = customer_context(
        customer_id=SAMPLE_CUSTOMER_ID,
        email=SAMPLE_EMAIL,
        phone=SAMPLE_PHONE,
        attributes=known_attributes or {},
    )
    for customer, who in (
        (bare, "a customer without attributes"),
        (full, "a customer with every known attribute"),
    ):
        context = slot_context(customer, campaign=SAMPLE_CAMPAIGN, experience=SAMPLE_EXPERIENCE)
        try:
            render_slot(slot, context)
        except TemplateProblem as exc:
            raise TemplateProblem(
                f"{exc.message} (rendering for {who})",
                line=exc.line,
                security=exc.security,
                kind=exc.kind,
            ) from exc


# --- links ------------------------------------------------------------------------------

_HREF = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(https?://[^"']+)\2""", re.IGNORECASE)


def link_targets(body: str) -> list[str]:
    """Every http(s) link target of `<a href>` in `body`, in order."""
    return [html.unescape(match.group(3)) for match in _HREF.finditer(body)]


def rewrite_links(
    body: str, track_link: Callable[[str], str], *, keep: set[str] = frozenset()
) -> tuple[str, list[str]]:
    """Replace every http(s) `<a href>` with `track_link(target)`; returns the new HTML
    and the original targets. Targets in `keep` stay as they are."""
    targets: list[str] = []

    def replace(match: re.Match[str]) -> str:
        target = html.unescape(match.group(3))
        if target in keep:
            return match.group(0)
        targets.append(target)
        quote = match.group(2)
        return f"{match.group(1)}{quote}{html.escape(track_link(target))}{quote}"

    return _HREF.sub(replace, body), targets


def _insert_after_body_start(body: str, snippet: str) -> str:
    match = re.search(r"<body\b[^>]*>", body, re.IGNORECASE)
    if match:
        return body[: match.end()] + snippet + body[match.end() :]
    return snippet + body


def _insert_before_body_end(body: str, snippet: str) -> str:
    index = body.lower().rfind("</body>")
    if index >= 0:
        return body[:index] + snippet + body[index:]
    return body + snippet


def _hidden_preheader(preheader: str) -> str:
    # Mail clients show the first text of the body beside the subject; hide it in the body.
    return (
        '<div class="preheader" style="display:none;max-height:0;overflow:hidden;'
        f'mso-hide:all">{html.escape(preheader)}</div>'
    )


def _unsubscribe_footer(url: str) -> str:
    return (
        '<p class="unsubscribe" style="font-size:12px;color:#777">'
        f'<a href="{html.escape(url)}">Unsubscribe</a> from these emails.</p>'
    )


# --- plain text -------------------------------------------------------------------------

_BLOCK_TAGS = {
    "p", "div", "br", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol",
    "section", "header", "footer", "hr", "blockquote",
}  # fmt: skip
_SKIPPED_TAGS = {"style", "script", "head", "title"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._hidden = 0
        self._href: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag in _SKIPPED_TAGS:
            self._skip += 1
        elif "preheader" in (attributes.get("class") or ""):
            self._hidden += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("- ")
        if tag == "a":
            self._href.append(attributes.get("href"))

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS and self._skip:
            self._skip -= 1
        elif tag == "div" and self._hidden:
            self._hidden -= 1
        if tag == "a" and self._href:
            href = self._href.pop()
            if href and not self._skip and not self._hidden:
                self.parts.append(f" ({href})")
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip and not self._hidden:
            self.parts.append(data)


def html_to_text(body: str) -> str:
    """A readable plain-text part of an HTML email: block elements on their own lines,
    links as `text (url)`, styles and the hidden preheader left out."""
    parser = _TextExtractor()
    parser.feed(body)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --- SMS segments -----------------------------------------------------------------------

_GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENSION = set("^{}\\[~]|€\f")


def sms_segments(body: str) -> tuple[str, int]:
    """The encoding an SMS needs and how many segments it takes.

    GSM-7: 160 septets in one segment, 153 per segment when concatenated (extension
    characters take two). Otherwise UCS-2: 70 UTF-16 units, 67 per part.
    """
    if all(char in _GSM7_BASIC or char in _GSM7_EXTENSION for char in body):
        septets = sum(2 if char in _GSM7_EXTENSION else 1 for char in body)
        return "GSM-7", 1 if septets <= 160 else math.ceil(septets / 153)
    units = len(body.encode("utf-16-le")) // 2
    return "UCS-2", 1 if units <= 70 else math.ceil(units / 67)
