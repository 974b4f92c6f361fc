"""Templates, rendering, tokens and send-timing rules: pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from activities.send_policy import frequency_cap_release, quiet_hours_end
from core.journeys import QuietHours
from core.rendering import (
    TemplateProblem,
    customer_context,
    html_to_text,
    render_email,
    render_sms,
    sms_segments,
    template_context,
    validate_template,
)
from core.tokens import (
    InvalidToken,
    TrackedLink,
    Unsubscribe,
    make_link_token,
    make_unsubscribe_token,
    read_link_token,
    read_unsubscribe_token,
)
from store.templates import SHIPPED_TEMPLATES_DIR, template_path_problem

CHAMPIONS = {
    "champions/welcome.html": "You're First in Line: Exclusive Preview Just for Our Top Shoppers!",
    "champions/vip_rewards.html": "VIP Rewards Await You, Grace!",
    "champions/recommendations.html": "Curated Just for You: Styles We Know You'll Love",
    "champions/share_story.html": "We're All Ears: Share Your Journey!",
}
SHIPPED = [
    "champions/welcome.html",
    "champions/reminder.html",
    "champions/vip_rewards.html",
    "champions/recommendations.html",
    "champions/share_story.html",
    *(
        f"{segment}/{kind}.html"
        for segment in ("regulars", "promising", "needs_attention", "at_risk")
        for kind in ("welcome", "reminder")
    ),
]


def _context(**attributes: object) -> dict[str, object]:
    customer = customer_context(
        customer_id="c-1", email="grace@example.com", phone=None, attributes=attributes
    )
    return template_context(
        customer, journey="champions", step="welcome", unsubscribe_url="https://j.example/u/TOKEN"
    )


def _source(path: str) -> str:
    return (SHIPPED_TEMPLATES_DIR / path).read_text()


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_email_validates_and_renders_with_a_tracked_link(path: str) -> None:
    source = _source(path)
    validate_template(source, path=path)
    rendered = render_email(
        source, _context(first_name="Grace"), track_link=lambda url: "https://j.example/t/X"
    )
    assert rendered.subject and rendered.preheader
    assert "Grace" in rendered.html
    assert rendered.links and all(
        link.startswith("https://shop.example.com/") for link in rendered.links
    )
    assert 'href="https://j.example/t/X"' in rendered.html
    assert 'href="https://j.example/u/TOKEN"' in rendered.html
    assert "https://j.example/t/X" in rendered.text


@pytest.mark.parametrize(("path", "subject"), CHAMPIONS.items())
def test_champions_subjects_are_the_seeds(path: str, subject: str) -> None:
    rendered = render_email(_source(path), _context(first_name="Grace"))
    assert rendered.subject == subject


def test_missing_first_name_falls_back_to_there_and_name_attribute_gives_first_word() -> None:
    assert "Hi there," in render_email(_source("champions/welcome.html"), _context()).text
    assert (
        "Dear Ada,"
        in render_email(_source("champions/vip_rewards.html"), _context(name="Ada Lovelace")).text
    )


def test_seed_text_is_in_the_welcome_email() -> None:
    text = render_email(_source("champions/welcome.html"), _context(first_name="Grace")).text
    assert "your support and loyalty haven't gone unnoticed" in text
    assert "Best,\nThe Team" in text


def test_sms_template_renders_and_counts_one_gsm_segment() -> None:
    path = "at_risk/winback.sms.txt"
    assert (SHIPPED_TEMPLATES_DIR / path).is_file()
    sms = render_sms(_source(path), _context(first_name="Grace"))
    assert sms.body.startswith("Shop: Hi Grace,") and "Reply STOP" in sms.body
    assert (sms.encoding, sms.segments) == ("GSM-7", 1)


def test_html_is_autoescaped_but_the_subject_is_plain_text() -> None:
    source = "{% block subject %}Hi {{ customer.first_name }}{% endblock %}{% block html %}<p>{{ customer.first_name }}</p>{% endblock %}"
    rendered = render_email(source, _context(first_name="<b>Eve</b>"))
    assert "<p>&lt;b&gt;Eve&lt;/b&gt;</p>" in rendered.html
    assert rendered.subject == "Hi <b>Eve</b>"


def test_undefined_attribute_fails_unless_defaulted() -> None:
    source = "{% block subject %}x{% endblock %}{% block html %}{{ customer.city }}{% endblock %}"
    with pytest.raises(TemplateProblem, match="city"):
        render_email(source, _context())
    defaulted = source.replace("customer.city", 'customer.city | default("your city")')
    assert "your city" in render_email(defaulted, _context()).html


@pytest.mark.parametrize(
    "expression",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ customer.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ],
)
def test_reaching_python_internals_is_a_security_problem(expression: str) -> None:
    source = "{% block subject %}x{% endblock %}{% block html %}" + expression + "{% endblock %}"
    with pytest.raises(TemplateProblem) as caught:
        render_email(source, _context())
    assert (
        caught.value.security
        or "unsafe" in caught.value.message
        or "undefined" in caught.value.message
    )


def test_attribute_escape_is_flagged_security() -> None:
    source = "{% block subject %}x{% endblock %}{% block html %}{{ ''.__class__ }}{% endblock %}"
    with pytest.raises(TemplateProblem) as caught:
        render_email(source, _context())
    assert caught.value.security


def test_syntax_error_names_the_line() -> None:
    source = "{% block subject %}x{% endblock %}\n{% block html %}\n<p>\n{% if x %}\n{% endblock %}"
    with pytest.raises(TemplateProblem) as caught:
        validate_template(source, path="a/b.html")
    assert caught.value.line == 5
    assert caught.value.message.startswith("line 5:")


def test_email_without_subject_block_is_refused() -> None:
    with pytest.raises(TemplateProblem, match="subject"):
        validate_template("{% block html %}x{% endblock %}", path="a/b.html")


def test_unsubscribe_footer_added_when_the_template_has_none() -> None:
    source = "{% block subject %}x{% endblock %}{% block html %}<html><body><p>Hi</p></body></html>{% endblock %}"
    rendered = render_email(source, _context(), track_link=lambda url: "https://j.example/t/X")
    assert 'href="https://j.example/u/TOKEN"' in rendered.html
    assert rendered.html.index("TOKEN") < rendered.html.index("</body>")


def test_text_part_skips_styles_and_the_hidden_preheader() -> None:
    text = html_to_text(
        '<html><head><style>p{color:red}</style></head><body><div class="preheader">hidden</div>'
        '<p>Hello <a href="https://x.example/a">there</a></p><ul><li>one</li></ul></body></html>'
    )
    assert text == "Hello there (https://x.example/a)\n\n- one"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("a" * 160, ("GSM-7", 1)),
        ("a" * 161, ("GSM-7", 2)),
        ("a" * 306, ("GSM-7", 2)),
        ("a" * 307, ("GSM-7", 3)),
        ("{" * 80, ("GSM-7", 1)),
        ("{" * 81, ("GSM-7", 2)),
        ("é" * 160, ("GSM-7", 1)),
        ("ł" * 70, ("UCS-2", 1)),
        ("ł" * 71, ("UCS-2", 2)),
        ("😀" * 35, ("UCS-2", 1)),
        ("😀" * 36, ("UCS-2", 2)),
    ],
)
def test_sms_segments(body: str, expected: tuple[str, int]) -> None:
    assert sms_segments(body) == expected


def test_template_paths() -> None:
    assert template_path_problem("champions/welcome.html") is None
    assert template_path_problem("at_risk/winback.sms.txt") is None
    assert template_path_problem("../etc/passwd.txt") is not None
    assert template_path_problem("/abs/x.html") is not None
    assert template_path_problem("x/y.py") is not None
    assert template_path_problem("journeys/champions.json") is not None


# --- tokens -----------------------------------------------------------------------------


def _flip(token: str, index: int) -> str:
    char = token[index]
    return token[:index] + ("A" if char != "A" else "B") + token[index + 1 :]


def test_link_token_round_trips_and_any_alteration_is_invalid() -> None:
    link = TrackedLink(
        workflow_id="journey:c:1",
        run_id="r1",
        step="welcome",
        message_id=7,
        url="https://shop.example.com/x?a=1&b=2",
    )
    token = make_link_token("secret", link)
    assert read_link_token("secret", token) == link
    for index in (0, len(token) // 2, len(token) - 1):
        with pytest.raises(InvalidToken):
            read_link_token("secret", _flip(token, index))
    with pytest.raises(InvalidToken):
        read_link_token("another-secret", token)
    # A token made for unsubscribing is not a link token, even with the same secret.
    unsubscribe = make_unsubscribe_token(
        "secret", Unsubscribe(customer_id="c", channel="email", message_id=1)
    )
    with pytest.raises(InvalidToken):
        read_link_token("secret", unsubscribe)
    assert read_unsubscribe_token("secret", unsubscribe).customer_id == "c"


# --- quiet hours and frequency cap --------------------------------------------------------

NIGHT = QuietHours(start="21:00", end="08:00", timezone_attribute="tz")


def test_quiet_hours_across_midnight_in_the_customers_zone() -> None:
    # 23:30 in Paris (UTC+1 in November) is 22:30 UTC: quiet until 08:00 Paris = 07:00 UTC.
    now = datetime(2026, 11, 24, 22, 30, tzinfo=UTC)
    assert quiet_hours_end(now, NIGHT, {"tz": "Europe/Paris"}) == datetime(
        2026, 11, 25, 7, 0, tzinfo=UTC
    )
    # 06:00 Paris = 05:00 UTC: quiet until 07:00 UTC the same day.
    early = datetime(2026, 11, 25, 5, 0, tzinfo=UTC)
    assert quiet_hours_end(early, NIGHT, {"tz": "Europe/Paris"}) == datetime(
        2026, 11, 25, 7, 0, tzinfo=UTC
    )
    # 12:00 Paris: not quiet.
    assert (
        quiet_hours_end(datetime(2026, 11, 25, 11, 0, tzinfo=UTC), NIGHT, {"tz": "Europe/Paris"})
        is None
    )


def test_quiet_hours_unknown_zone_uses_the_default() -> None:
    now = datetime(2026, 11, 24, 22, 30, tzinfo=UTC)
    assert quiet_hours_end(now, NIGHT, {"tz": "Mars/Olympus"}) == datetime(
        2026, 11, 25, 8, 0, tzinfo=UTC
    )
    same_day = QuietHours(start="12:00", end="14:00")
    assert quiet_hours_end(datetime(2026, 11, 24, 13, 0, tzinfo=UTC), same_day, {}) == datetime(
        2026, 11, 24, 14, 0, tzinfo=UTC
    )
    assert quiet_hours_end(datetime(2026, 11, 24, 14, 0, tzinfo=UTC), same_day, {}) is None


def test_frequency_cap_release() -> None:
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    week = timedelta(days=7)
    sent = [now - timedelta(days=6), now - timedelta(days=3), now - timedelta(days=1)]
    assert frequency_cap_release(now, max_messages=4, per=week, sent_times=sent) is None
    assert frequency_cap_release(now, max_messages=3, per=week, sent_times=sent) == now + timedelta(
        days=1
    )
    assert frequency_cap_release(now, max_messages=2, per=week, sent_times=sent) == now + timedelta(
        days=4
    )
    # Sends older than the window do not count.
    assert (
        frequency_cap_release(now, max_messages=1, per=week, sent_times=[now - timedelta(days=8)])
        is None
    )
