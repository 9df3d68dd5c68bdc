"""Generates grafana/dashboards/signalwire-exporter.json, the exporter's Grafana dashboard.

The dashboard is written as code so that every panel is built the same way: one datasource
reference (the `datasource` variable), one project filter (the `project` variable), a description
on every panel, and a grid laid out row by row. Edit this file, then run

    python3 grafana/generate_dashboard.py          # rewrites the JSON
    python3 grafana/generate_dashboard.py --check  # exit 1 if the JSON is out of date

Standard library only. The queries use the metric names of the exporter's contract and nothing
else, so the dashboard works without recording rules.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "signalwire-exporter.json"

UID = "signalwire-exporter"
TITLE = "SignalWire messaging"
SCHEMA_VERSION = 39

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# The selector every query carries.
P = 'project=~"$project"'
# SignalWire's outbound directions: outbound-api, outbound-reply, outbound-call, outbound.
OUT = 'direction=~"outbound.*"'
FAILED = 'status=~"failed|undelivered"'

Panel = dict[str, Any]


def _target(
    expr: str, legend: str = "", *, ref: str = "A", instant: bool = False, table: bool = False
) -> dict[str, Any]:
    target: dict[str, Any] = {
        "datasource": dict(DATASOURCE),
        "editorMode": "code",
        "expr": expr,
        "instant": instant,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "refId": ref,
    }
    if table:
        target["format"] = "table"
    return target


def _thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }


GREEN = _thresholds((None, "green"))


def _field_defaults(
    unit: str,
    *,
    decimals: int | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    thresholds: dict[str, Any] | None = None,
    custom: dict[str, Any] | None = None,
    mappings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "color": {"mode": "palette-classic" if custom is not None else "thresholds"},
        "mappings": mappings or [],
        "thresholds": thresholds or GREEN,
        "unit": unit,
    }
    if custom is not None:
        defaults["custom"] = custom
    if decimals is not None:
        defaults["decimals"] = decimals
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    return defaults


def timeseries(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    axis_label: str = "",
    stack: bool = False,
    bars: bool = False,
    minimum: float | None = 0,
    maximum: float | None = None,
    thresholds: dict[str, Any] | None = None,
    interval: str | None = None,
    time_from: str | None = None,
    width: int = 8,
    height: int = 8,
) -> Panel:
    custom: dict[str, Any] = {
        "axisBorderShow": False,
        "axisCenteredZero": False,
        "axisColorMode": "text",
        "axisLabel": axis_label,
        "axisPlacement": "auto",
        "barAlignment": -1 if bars else 0,
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 80 if bars else (25 if stack else 10),
        "gradientMode": "none",
        "hideFrom": {"legend": False, "tooltip": False, "viz": False},
        "insertNulls": False,
        "lineInterpolation": "linear",
        "lineWidth": 1,
        "pointSize": 4,
        "scaleDistribution": {"type": "linear"},
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
        "thresholdsStyle": {"mode": "dashed" if thresholds else "off"},
    }
    panel: Panel = {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "fieldConfig": {
            "defaults": _field_defaults(
                unit, minimum=minimum, maximum=maximum, thresholds=thresholds, custom=custom
            ),
            "overrides": [],
        },
        "options": {
            "legend": {
                "calcs": ["mean", "max", "lastNotNull"],
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
        "_size": (width, height),
    }
    if interval:
        panel["interval"] = interval
    if time_from:
        panel["timeFrom"] = time_from
    return panel


def stat(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    decimals: int | None = None,
    thresholds: dict[str, Any] | None = None,
    mappings: list[dict[str, Any]] | None = None,
    text_mode: str = "auto",
    color_mode: str = "value",
    width: int = 4,
    height: int = 4,
) -> Panel:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "fieldConfig": {
            "defaults": _field_defaults(
                unit, decimals=decimals, thresholds=thresholds, mappings=mappings
            ),
            "overrides": [],
        },
        "options": {
            "colorMode": color_mode,
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showPercentChange": False,
            "textMode": text_mode,
            "wideLayout": True,
        },
        "targets": targets,
        "_size": (width, height),
    }


def bargauge(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    unit: str = "short",
    width: int = 8,
    height: int = 8,
) -> Panel:
    return {
        "type": "bargauge",
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "fieldConfig": {
            "defaults": _field_defaults(unit, minimum=0),
            "overrides": [],
        },
        "options": {
            "displayMode": "gradient",
            "maxVizHeight": 300,
            "minVizHeight": 16,
            "minVizWidth": 8,
            "namePlacement": "auto",
            "orientation": "horizontal",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showUnfilled": True,
            "sizing": "auto",
            "valueMode": "color",
        },
        "targets": targets,
        "_size": (width, height),
    }


def table(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    columns: dict[str, str],
    sort_by: str,
    width: int = 24,
    height: int = 9,
) -> Panel:
    """A table of one instant query; `columns` maps label names to headers, in order."""
    order = ["Time", *columns]
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "custom": {
                    "align": "auto",
                    "cellOptions": {"type": "auto"},
                    "filterable": True,
                    "inspect": False,
                },
                "mappings": [],
                "thresholds": GREEN,
                "unit": "short",
            },
            "overrides": [],
        },
        "options": {
            "cellHeight": "sm",
            "footer": {"countRows": False, "fields": "", "reducer": ["sum"], "show": False},
            "showHeader": True,
            "sortBy": [{"desc": True, "displayName": sort_by}],
        },
        "targets": targets,
        "transformations": [
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True},
                    "indexByName": {name: i for i, name in enumerate(order)},
                    "renameByName": dict(columns),
                },
            }
        ],
        "_size": (width, height),
    }


def breakdown_table(
    title: str,
    description: str,
    label: str,
    header: str,
    columns: list[tuple[str, str, str, int]],
    *,
    sort_by: str,
    thresholds: dict[str, dict[str, Any]] | None = None,
    width: int = 24,
    height: int = 9,
) -> Panel:
    """A table with one row per value of `label` and one column per instant query.

    `columns` lists (header, query, unit, decimals); the queries' frames are merged on `label`.
    `thresholds` colours the text of the columns it names.
    """
    refs = [chr(ord("A") + i) for i in range(len(columns))]
    names = {f"Value #{ref}": name for ref, (name, _, _, _) in zip(refs, columns, strict=True)}
    overrides = []
    for name, _, unit, decimals in columns:
        properties: list[dict[str, Any]] = [
            {"id": "unit", "value": unit},
            {"id": "decimals", "value": decimals},
        ]
        if thresholds and name in thresholds:
            properties += [
                {"id": "thresholds", "value": thresholds[name]},
                {"id": "custom.cellOptions", "value": {"type": "color-text"}},
            ]
        overrides.append({"matcher": {"id": "byName", "options": name}, "properties": properties})
    panel = table(
        title,
        description,
        [
            _target(query, ref=ref, instant=True, table=True)
            for ref, (_, query, _, _) in zip(refs, columns, strict=True)
        ],
        columns={label: header, **names},
        sort_by=sort_by,
        width=width,
        height=height,
    )
    panel["fieldConfig"]["overrides"] = overrides
    panel["transformations"].insert(0, {"id": "merge", "options": {}})
    return panel


# Grafana's own list of countries, keyed by ISO 3166 alpha-2 (and alpha-3) code.
GAZETTEER_COUNTRIES = "public/gazetteer/countries.json"


def geomap(
    title: str,
    description: str,
    targets: list[dict[str, Any]],
    *,
    lookup: str,
    unit: str = "short",
    decimals: int | None = None,
    maximum: float | None = None,
    thresholds: dict[str, Any] | None = None,
    width: int = 12,
    height: int = 10,
) -> Panel:
    """A world map with one marker per row of an instant table query, placed by looking up the
    country code in field `lookup` and coloured by its value (field "Value")."""
    defaults = _field_defaults(
        unit, decimals=decimals, minimum=0, maximum=maximum, thresholds=thresholds
    )
    defaults["custom"] = {"hideFrom": {"legend": False, "tooltip": False, "viz": False}}
    return {
        "type": "geomap",
        "title": title,
        "description": description,
        "datasource": dict(DATASOURCE),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "basemap": {"config": {}, "name": "Basemap", "type": "default"},
            "controls": {
                "mouseWheelZoom": False,
                "showAttribution": True,
                "showDebug": False,
                "showMeasure": False,
                "showScale": False,
                "showZoom": True,
            },
            "layers": [
                {
                    "config": {
                        "showLegend": True,
                        "style": {
                            "color": {"field": "Value", "fixed": "dark-green"},
                            "opacity": 0.7,
                            "rotation": {"fixed": 0, "max": 360, "min": -360, "mode": "mod"},
                            "size": {"fixed": 8, "max": 15, "min": 2},
                            "symbol": {"fixed": "img/icons/marker/circle.svg", "mode": "fixed"},
                            "symbolAlign": {"horizontal": "center", "vertical": "center"},
                            "text": {"field": lookup, "fixed": "", "mode": "field"},
                            "textConfig": {
                                "fontSize": 10,
                                "offsetX": 0,
                                "offsetY": -14,
                                "textAlign": "center",
                                "textBaseline": "middle",
                            },
                        },
                    },
                    "location": {
                        "gazetteer": GAZETTEER_COUNTRIES,
                        "lookup": lookup,
                        "mode": "lookup",
                    },
                    "name": title,
                    "tooltip": True,
                    "type": "markers",
                }
            ],
            "tooltip": {"mode": "details"},
            "view": {"allLayers": True, "id": "zero", "lat": 20, "lon": 0, "zoom": 1},
        },
        "targets": targets,
        "_size": (width, height),
    }


UP_MAPPINGS = [
    {
        "options": {
            "0": {"color": "red", "index": 1, "text": "DOWN"},
            "1": {"color": "green", "index": 0, "text": "UP"},
        },
        "type": "value",
    }
]


def _sum_increase(metric: str, selector: str, window: str) -> str:
    return f"sum(increase({metric}{{{selector}}}[{window}]))"


def _share(numerator: str, denominator: str, by: str) -> str:
    """sum by (`by`) of `numerator` over sum by (`by`) of `denominator` (PromQL expressions of one
    series each, summed): 0, not absent, where the denominator has series but the numerator
    none."""
    return (
        f"(\n  sum by ({by}) ({numerator})\nor\n  0 * sum by ({by}) ({denominator})\n)\n/\n"
        f"sum by ({by}) ({denominator})"
    )


def overview() -> list[Panel]:
    messages = "signalwire_messages_total"
    return [
        stat(
            "Messages settled",
            "Messages that settled (reached their final status) in the selected time range, "
            "all directions and kinds.",
            [_target(_sum_increase(messages, P, "$__range"), instant=True)],
            decimals=0,
        ),
        stat(
            "Outbound SMS delivery ratio",
            "Share of the outbound SMS settled in the selected time range whose final status is "
            "delivered. MMS are left out: they never get a delivery receipt and settle as sent.",
            [
                _target(
                    _sum_increase(
                        messages, f'{P}, {OUT}, kind="sms", status="delivered"', "$__range"
                    )
                    + "\n/\n"
                    + _sum_increase(messages, f'{P}, {OUT}, kind="sms"', "$__range"),
                    instant=True,
                )
            ],
            unit="percentunit",
            decimals=1,
            thresholds=_thresholds((None, "red"), (0.9, "orange"), (0.97, "green")),
        ),
        stat(
            "Outbound failure ratio",
            "Share of the outbound messages settled in the selected time range whose final "
            "status is failed or undelivered.",
            [
                _target(
                    _sum_increase(messages, f"{P}, {OUT}, {FAILED}", "$__range")
                    + "\n/\n"
                    + _sum_increase(messages, f"{P}, {OUT}", "$__range"),
                    instant=True,
                )
            ],
            unit="percentunit",
            decimals=1,
            thresholds=_thresholds((None, "green"), (0.03, "orange"), (0.1, "red")),
        ),
        stat(
            "Spend",
            "Charge of the messages settled in the selected time range, in US dollars, as "
            "SignalWire reports it on each message.",
            [
                _target(
                    _sum_increase("signalwire_message_charge_usd_total", P, "$__range"),
                    instant=True,
                )
            ],
            unit="currencyUSD",
            decimals=2,
        ),
        stat(
            "Pending messages",
            "Messages seen but not settled yet (queued, sent without a receipt so far, ...), "
            "right now.",
            [_target(f"sum(signalwire_messages_pending{{{P}}})")],
            decimals=0,
        ),
        stat(
            "Projects up",
            "Projects whose last poll of SignalWire succeeded, out of the projects selected.",
            [
                _target(f"sum(signalwire_up{{{P}}})", "up", ref="A"),
                _target(f"count(signalwire_up{{{P}}})", "selected", ref="B"),
            ],
            decimals=0,
            text_mode="value_and_name",
            color_mode="none",
        ),
    ]


def volume() -> list[Panel]:
    def by(label: str) -> dict[str, Any]:
        return _target(
            f"sum by ({label}) (rate(signalwire_messages_total{{{P}}}[$__rate_interval]))",
            f"{{{{{label}}}}}",
        )

    per_second = "messages/s"
    return [
        timeseries(
            "Messages by direction",
            "Messages settled per second, by direction (inbound, outbound-api, outbound-reply, "
            "...). A message counts once, when it settles, not when it is sent.",
            [by("direction")],
            axis_label=per_second,
            stack=True,
        ),
        timeseries(
            "Messages by kind",
            "Messages settled per second, SMS against MMS.",
            [by("kind")],
            axis_label=per_second,
            stack=True,
        ),
        timeseries(
            "Messages by status",
            "Messages settled per second, by final status (delivered, undelivered, failed, "
            "received, and sent for MMS or for an SMS whose receipt never came).",
            [by("status")],
            axis_label=per_second,
            stack=True,
        ),
        timeseries(
            "Messages by project",
            "Messages settled per second in each selected project, by direction.",
            [
                _target(
                    "sum by (project, direction) "
                    f"(rate(signalwire_messages_total{{{P}}}[$__rate_interval]))",
                    "{{project}} {{direction}}",
                )
            ],
            axis_label=per_second,
            width=24,
        ),
    ]


def delivery() -> list[Panel]:
    def ratio(numerator: str, denominator: str, by: str) -> str:
        return (
            f"sum by ({by}) (rate(signalwire_messages_total{{{numerator}}}[$__rate_interval]))\n/\n"
            f"sum by ({by}) (rate(signalwire_messages_total{{{denominator}}}[$__rate_interval]))"
        )

    return [
        timeseries(
            "Outbound SMS delivery ratio",
            "Share of the outbound SMS settled in each interval whose final status is delivered. "
            "MMS are left out: they never get a delivery receipt and settle as sent. An SMS "
            "without a receipt after settle.timeout (2h by default) settles as sent and lowers "
            "this ratio.",
            [
                _target(
                    ratio(
                        f'{P}, {OUT}, kind="sms", status="delivered"',
                        f'{P}, {OUT}, kind="sms"',
                        "project",
                    ),
                    "{{project}}",
                )
            ],
            unit="percentunit",
            maximum=1,
        ),
        timeseries(
            "Outbound failure ratio",
            "Share of the outbound messages settled in each interval whose final status is "
            "failed or undelivered, by project and kind.",
            [
                _target(
                    ratio(f"{P}, {OUT}, {FAILED}", f"{P}, {OUT}", "project, kind"),
                    "{{project}} {{kind}}",
                )
            ],
            unit="percentunit",
            maximum=1,
            thresholds=_thresholds((None, "green"), (0.1, "red")),
        ),
        timeseries(
            "Failure ratio over the exporter's window",
            "signalwire_message_failure_ratio: the share failed or undelivered among the "
            "outbound messages settled in the exporter's failure_ratio_window (15m by default), "
            "as computed by the exporter at each poll. Absent while nothing settled in the window.",
            [
                _target(
                    f"signalwire_message_failure_ratio{{{P}, {OUT}}}",
                    "{{project}} {{direction}} {{kind}}",
                )
            ],
            unit="percentunit",
            maximum=1,
            thresholds=_thresholds((None, "green"), (0.1, "red")),
        ),
    ]


def _with_descriptions(counts: str) -> str:
    """Joins per-(project, error_code) counts with their descriptions.

    Codes without a description (`other`, or a code SignalWire never described) are kept, with an
    empty description, by the `or on (project, error_code)` fallback.
    """
    return (
        f"{counts}\n"
        "* on (project, error_code) group_left (error_message)\n"
        f"signalwire_message_error_info{{{P}}}\n"
        f"or on (project, error_code)\n{counts}"
    )


def failures() -> list[Panel]:
    errors = f'{P}, error_code!=""'
    in_range = (
        "sum by (project, status, error_code) "
        f"(increase(signalwire_messages_total{{{errors}}}[$__range]))"
    )
    rate = (
        "sum by (project, error_code) "
        f"(rate(signalwire_messages_total{{{errors}}}[$__rate_interval]))"
    )
    return [
        table(
            "Error codes in the time range",
            "Messages settled with an error code in the selected time range, by project, final "
            "status and error code, with SignalWire's latest description of the code "
            '(signalwire_message_error_info). error_code "other" gathers the codes past '
            "limits.max_error_codes; it has no description.",
            [_target(_with_descriptions(in_range), instant=True, table=True)],
            columns={
                "project": "Project",
                "status": "Status",
                "error_code": "Error code",
                "error_message": "Description",
                "Value": "Messages",
            },
            sort_by="Messages",
            width=14,
        ),
        timeseries(
            "Failures by error code",
            "Messages settled with an error code, per second, by project and error code, with "
            "the code's description in the legend.",
            [_target(_with_descriptions(rate), "{{project}} {{error_code}} {{error_message}}")],
            axis_label="messages/s",
            stack=True,
            width=10,
            height=9,
        ),
    ]


def _with_categories(counts: str) -> str:
    """Joins per-(project, error_code) counts with the category of their error code, then sums
    them by category. A count whose code has no signalwire_message_error_info (no error code, or
    `other`) is kept as category "unknown" by the `or on (project, error_code)` fallback."""
    return (
        "sum by (category) (\n"
        f"  {counts}\n"
        "  * on (project, error_code) group_left (category)\n"
        f"  group by (project, error_code, category) (signalwire_message_error_info{{{P}}})\n"
        "or on (project, error_code)\n"
        f'  label_replace({counts}, "category", "unknown", "", "")\n'
        ")"
    )


def categories() -> list[Panel]:
    failed = f"{P}, {OUT}, {FAILED}"

    def counts(window: str, function: str = "rate") -> str:
        return (
            f"sum by (project, error_code) "
            f"({function}(signalwire_messages_total{{{failed}}}[{window}]))"
        )

    categories_text = (
        "The category comes from the error code (signalwire_message_error_info): "
        "carrier_filtering (content or sender registration), unreachable, opted_out, "
        "invalid_number, volume_limit, account, and unknown (including failures without an "
        "error code)."
    )
    return [
        timeseries(
            "Outbound failures by category",
            "Outbound messages settled as failed or undelivered, per second, by the category of "
            f"their error code. {categories_text}",
            [_target(_with_categories(counts("$__rate_interval")), "{{category}}")],
            axis_label="messages/s",
            stack=True,
            width=10,
        ),
        timeseries(
            "Outbound failure ratio by category",
            "Share of the outbound messages settled in each interval that failed with an error "
            "code of each category. SignalWireCarrierFiltering fires when carrier_filtering "
            "stays above 5 % (default) of an hour's messages.",
            [
                _target(
                    _with_categories(counts("$__rate_interval"))
                    + "\n/ on () group_left ()\n"
                    + f"sum(rate(signalwire_messages_total{{{P}, {OUT}}}[$__rate_interval]))",
                    "{{category}}",
                )
            ],
            unit="percentunit",
            width=8,
        ),
        bargauge(
            "Failures by category in the time range",
            "Outbound messages settled as failed or undelivered in the selected time range, by "
            "the category of their error code.",
            [
                _target(
                    _with_categories(counts("$__range", "increase")),
                    "{{category}}",
                    instant=True,
                )
            ],
            width=6,
        ),
    ]


def countries() -> list[Panel]:
    by_country = "signalwire_messages_by_country_total"

    def count(selector: str) -> str:
        return f"increase({by_country}{{{selector}}}[$__range])"

    failure_ratio = _share(count(f"{P}, {OUT}, {FAILED}"), count(f"{P}, {OUT}"), "country")
    failure_colours = _thresholds((None, "green"), (0.03, "orange"), (0.1, "red"))
    return [
        breakdown_table(
            "Countries in the time range",
            "Messages settled in the selected time range by the country of the remote number "
            '(ISO code), with their delivery and failure ratios and their charge. "unknown": the '
            'remote party is not a phone number (a short code, an alphanumeric sender); "other": '
            "countries past limits.max_countries.",
            "country",
            "Country",
            [
                ("Messages", f"sum by (country) ({count(P)})", "short", 0),
                ("Outbound", f"sum by (country) ({count(f'{P}, {OUT}')})", "short", 0),
                (
                    "Outbound SMS delivered",
                    _share(
                        count(f'{P}, {OUT}, kind="sms", status="delivered"'),
                        count(f'{P}, {OUT}, kind="sms"'),
                        "country",
                    ),
                    "percentunit",
                    1,
                ),
                ("Outbound failed", failure_ratio, "percentunit", 1),
                (
                    "Spend",
                    "sum by (country) "
                    f"(increase(signalwire_message_charge_usd_by_country_total{{{P}}}[$__range]))",
                    "currencyUSD",
                    2,
                ),
            ],
            sort_by="Messages",
            thresholds={"Outbound failed": failure_colours},
            width=12,
            height=10,
        ),
        geomap(
            "Outbound failure ratio by country",
            "Share of the outbound messages settled in the selected time range that failed or "
            "were undelivered, by the country of the recipient's number, one marker per country "
            'with outbound traffic ("unknown" and "other" are in the table, not on the map).',
            [_target(failure_ratio, instant=True, table=True)],
            lookup="country",
            unit="percentunit",
            decimals=1,
            maximum=1,
            thresholds=failure_colours,
            width=12,
            height=10,
        ),
    ]


def number_groups() -> list[Panel]:
    by_group = "signalwire_messages_by_number_group_total"
    charge = "signalwire_message_charge_usd_by_number_group_total"

    def count(selector: str, window: str = "$__range") -> str:
        return f"increase({by_group}{{{selector}}}[{window}])"

    def per_second(selector: str) -> str:
        return f"rate({by_group}{{{selector}}}[$__rate_interval])"

    groups_text = (
        "The group of the project's own number, as named under number_groups in the "
        'exporter\'s configuration; "ungrouped" for the numbers in none.'
    )
    return [
        timeseries(
            "Messages by number group",
            f"Messages settled per second, by number group. {groups_text}",
            [
                _target(
                    f"sum by (number_group) ({per_second(P)})",
                    "{{number_group}}",
                )
            ],
            axis_label="messages/s",
            stack=True,
        ),
        timeseries(
            "Outbound failure ratio by number group",
            "Share of the outbound messages settled in each interval that failed or were "
            f"undelivered, by number group. {groups_text}",
            [
                _target(
                    _share(
                        per_second(f"{P}, {OUT}, {FAILED}"),
                        per_second(f"{P}, {OUT}"),
                        "number_group",
                    ),
                    "{{number_group}}",
                )
            ],
            unit="percentunit",
            maximum=1,
            thresholds=_thresholds((None, "green"), (0.1, "red")),
        ),
        timeseries(
            "Spend per hour by number group",
            "Charge of the messages settled in the hour before each point, in US dollars, by "
            "number group (one point per hour at most).",
            [
                _target(
                    f"sum by (number_group) (increase({charge}{{{P}}}[1h]))",
                    "{{number_group}}",
                )
            ],
            unit="currencyUSD",
            bars=True,
            stack=True,
            interval="1h",
        ),
        breakdown_table(
            "Number groups in the time range",
            "Messages settled in the selected time range by number group, with the outbound "
            f"failure ratio and the charge. {groups_text}",
            "number_group",
            "Number group",
            [
                ("Messages", f"sum by (number_group) ({count(P)})", "short", 0),
                ("Outbound", f"sum by (number_group) ({count(f'{P}, {OUT}')})", "short", 0),
                (
                    "Outbound failed",
                    _share(count(f"{P}, {OUT}, {FAILED}"), count(f"{P}, {OUT}"), "number_group"),
                    "percentunit",
                    1,
                ),
                (
                    "Spend",
                    f"sum by (number_group) (increase({charge}{{{P}}}[$__range]))",
                    "currencyUSD",
                    2,
                ),
            ],
            sort_by="Messages",
            thresholds={
                "Outbound failed": _thresholds((None, "green"), (0.03, "orange"), (0.1, "red"))
            },
            height=7,
        ),
    ]


def spend() -> list[Panel]:
    charge = "signalwire_message_charge_usd_total"
    return [
        stat(
            "Spend in the last 24 hours",
            "Charge of the messages settled in the last 24 hours, in US dollars.",
            [_target(_sum_increase(charge, P, "1d"), instant=True)],
            unit="currencyUSD",
            decimals=2,
            width=6,
        ),
        stat(
            "Projected month (24h basis)",
            "A projection of this month's spend: the spend of the last 24 hours multiplied by "
            "the number of days in the current month (UTC). Reacts quickly to a change in "
            "traffic.",
            [_target(_sum_increase(charge, P, "1d") + " * days_in_month()", instant=True)],
            unit="currencyUSD",
            decimals=0,
            width=6,
        ),
        stat(
            "Projected month (7d basis)",
            "A projection of this month's spend: the spend of the last 7 days divided by 7, "
            "multiplied by the number of days in the current month (UTC). Steadier than the 24h "
            "basis, but too low while the exporter has less than 7 days of history.",
            [_target(_sum_increase(charge, P, "7d") + " / 7 * days_in_month()", instant=True)],
            unit="currencyUSD",
            decimals=0,
            width=6,
        ),
        stat(
            "Average charge per message",
            "Charge per settled message over the selected time range, in US dollars.",
            [
                _target(
                    _sum_increase(charge, P, "$__range")
                    + "\n/\n"
                    + _sum_increase("signalwire_messages_total", P, "$__range"),
                    instant=True,
                )
            ],
            unit="currencyUSD",
            decimals=4,
            width=6,
        ),
        timeseries(
            "Spend per hour",
            "Charge of the messages settled in the hour before each point, in US dollars, by "
            "project (one point per hour at most).",
            [_target(f"sum by (project) (increase({charge}{{{P}}}[1h]))", "{{project}}")],
            unit="currencyUSD",
            bars=True,
            stack=True,
            interval="1h",
            width=12,
        ),
        timeseries(
            "Spend per day",
            "Charge of the messages settled each day (UTC), in US dollars, by project, over the "
            "last 30 days whatever the dashboard's time range.",
            [_target(f"sum by (project) (increase({charge}{{{P}}}[1d]))", "{{project}}")],
            unit="currencyUSD",
            bars=True,
            stack=True,
            interval="1d",
            time_from="30d",
            width=12,
        ),
    ]


def segments() -> list[Panel]:
    segs = "signalwire_message_segments_total"
    msgs = "signalwire_messages_total"
    return [
        timeseries(
            "Segments per message",
            "Average number of segments of the messages settled in each interval, by direction "
            "and kind. SMS longer than one segment are billed per segment; an MMS counts as one.",
            [
                _target(
                    f"sum by (direction, kind) (rate({segs}{{{P}}}[$__rate_interval]))\n/\n"
                    f"sum by (direction, kind) (rate({msgs}{{{P}}}[$__rate_interval]))",
                    "{{direction}} {{kind}}",
                )
            ],
            minimum=1,
            width=10,
        ),
        timeseries(
            "Segments settled",
            "Segments of the messages settled, per second, by direction.",
            [
                _target(
                    f"sum by (direction) (rate({segs}{{{P}}}[$__rate_interval]))",
                    "{{direction}}",
                )
            ],
            axis_label="segments/s",
            stack=True,
            width=10,
        ),
        stat(
            "Segments per message in the range",
            "Average number of segments per settled message over the selected time range.",
            [
                _target(
                    _sum_increase(segs, P, "$__range")
                    + "\n/\n"
                    + _sum_increase(msgs, P, "$__range"),
                    instant=True,
                )
            ],
            decimals=2,
            height=8,
        ),
    ]


def pending() -> list[Panel]:
    return [
        timeseries(
            "Pending messages by status",
            "Messages seen but not settled yet, by their latest status. A message stays here "
            "until it reaches a final status, or until settle.timeout (2h by default) passes.",
            [
                _target(
                    f"sum by (status) (signalwire_messages_pending{{{P}}})",
                    "{{status}}",
                )
            ],
            stack=True,
            width=16,
        ),
        bargauge(
            "Pending messages now",
            "Messages pending right now, by project, direction, kind and latest status.",
            [
                _target(
                    "sum by (project, direction, kind, status) "
                    f"(signalwire_messages_pending{{{P}}})",
                    "{{project}} {{direction}} {{kind}} {{status}}",
                    instant=True,
                )
            ],
            width=8,
        ),
    ]


def late_receipts() -> list[Panel]:
    oldest = "signalwire_messages_pending_oldest_created_timestamp_seconds"
    late = _thresholds((None, "green"), (1800, "orange"))
    return [
        timeseries(
            "Oldest pending message by status",
            "Age of the oldest message not settled yet, by its latest status: how long it has "
            "waited (queued at SignalWire, or sent and waiting for the carrier's delivery "
            "receipt). Absent while nothing is pending in that status. A message leaves at its "
            "final status, or after settle.timeout (2h by default).",
            [_target(f"max by (status) (time() - {oldest}{{{P}}})", "{{status}}")],
            unit="s",
            thresholds=late,
            width=8,
        ),
        timeseries(
            "Outbound SMS waiting for a receipt",
            "Age of the oldest outbound SMS in status sent (handed to the carrier, delivery "
            "receipt not in yet), by project and direction. SignalWireReceiptsLate fires when it "
            "stays above 30 minutes (default, the dashed line) for 10 minutes.",
            [
                _target(
                    "max by (project, direction) "
                    f'(time() - {oldest}{{{P}, {OUT}, kind="sms", status="sent"}})',
                    "{{project}} {{direction}}",
                )
            ],
            unit="s",
            thresholds=late,
            width=8,
        ),
        bargauge(
            "Oldest pending message now",
            "Age of the oldest pending message right now, by project, direction, kind and latest "
            "status.",
            [
                _target(
                    f"max by (project, direction, kind, status) (time() - {oldest}{{{P}}})",
                    "{{project}} {{direction}} {{kind}} {{status}}",
                    instant=True,
                )
            ],
            unit="s",
            width=8,
        ),
    ]


def health() -> list[Panel]:
    return [
        stat(
            "Up",
            "1 (UP) if the last poll of the project succeeded, 0 (DOWN) otherwise: bad "
            "credentials, SignalWire unreachable or answering errors. The exporter's landing "
            "page shows the last error.",
            [_target(f"signalwire_up{{{P}}}", "{{project}}")],
            mappings=UP_MAPPINGS,
            thresholds=_thresholds((None, "red"), (1, "green")),
            color_mode="background",
            width=6,
        ),
        stat(
            "Time since the last successful poll",
            "Seconds since the end of the project's last successful poll. Beyond a few poll "
            "intervals the counts are going stale.",
            [
                _target(
                    f"time() - signalwire_last_successful_poll_timestamp_seconds{{{P}}}",
                    "{{project}}",
                )
            ],
            unit="s",
            decimals=0,
            thresholds=_thresholds((None, "green"), (120, "orange"), (300, "red")),
            width=6,
        ),
        stat(
            "Exporter version",
            "Versions of the exporters serving the selected projects "
            "(signalwire_exporter_build_info).",
            [
                _target(
                    "count by (version) (signalwire_exporter_build_info\n"
                    f"and on (job, instance) signalwire_up{{{P}}})",
                    "{{version}}",
                )
            ],
            text_mode="name",
            color_mode="none",
            width=6,
        ),
        stat(
            "Invalid records",
            "Records skipped as malformed in the selected time range (each counted once; the "
            "logs name them). Anything above zero deserves a look.",
            [
                _target(
                    _sum_increase("signalwire_invalid_records_total", P, "$__range"),
                    instant=True,
                )
            ],
            decimals=0,
            thresholds=_thresholds((None, "green"), (1, "orange")),
            width=6,
        ),
        timeseries(
            "Cursor lag",
            "How far behind now the cursor is: every message created before the cursor has "
            "been fetched. It trails the listing by about 60s by design; a growing lag means "
            "the exporter is not keeping up or cannot reach SignalWire.",
            [
                _target(
                    f"time() - signalwire_cursor_timestamp_seconds{{{P}}}",
                    "{{project}}",
                )
            ],
            unit="s",
        ),
        timeseries(
            "Poll duration",
            "Duration of the project's last poll (listing, paging and refreshing pending "
            "messages), in seconds.",
            [_target(f"signalwire_poll_duration_seconds{{{P}}}", "{{project}}")],
            unit="s",
        ),
        timeseries(
            "Records shown late",
            "Records that SignalWire's log showed only after the cursor had passed their "
            "created_at, per interval. They are counted all the same (up to max_ingestion_delay "
            "late); many of them mean the log lags: the exporter's log says how late they came.",
            [
                _target(
                    "sum by (project) "
                    f"(increase(signalwire_late_records_total{{{P}}}[$__rate_interval]))",
                    "{{project}}",
                )
            ],
        ),
        timeseries(
            "SignalWire API requests by status code",
            'Requests to SignalWire per second, by HTTP status code; code "error" counts '
            "timeouts and connection failures. 429 means rate limiting, 401/403 bad "
            "credentials.",
            [
                _target(
                    "sum by (project, code) "
                    f"(rate(signalwire_api_requests_total{{{P}}}[$__rate_interval]))",
                    "{{project}} {{code}}",
                )
            ],
            unit="reqps",
            stack=True,
        ),
    ]


ROWS: list[tuple[str, Any]] = [
    ("Overview", overview),
    ("Volume", volume),
    ("Delivery and failures (outbound)", delivery),
    ("Failures by error code", failures),
    ("Failures by category", categories),
    ("By country", countries),
    ("By number group", number_groups),
    ("Spend", spend),
    ("Segments", segments),
    ("Pending messages", pending),
    ("Late receipts", late_receipts),
    ("Exporter health", health),
]


def _layout() -> list[Panel]:
    """Places the rows one below the other and their panels left to right, wrapping at 24."""
    panels: list[Panel] = []
    next_id = 1
    y = 0
    for title, build in ROWS:
        panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "id": next_id,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        x = 0
        line_height = 0
        for panel in build():
            width, height = panel.pop("_size")
            if x + width > 24:
                x, y, line_height = 0, y + line_height, 0
            panel["id"] = next_id
            panel["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
            panels.append(panel)
            next_id += 1
            x += width
            line_height = max(line_height, height)
        y += line_height
    return panels


def _templating() -> dict[str, Any]:
    project_query = "label_values(signalwire_up, project)"
    return {
        "list": [
            {
                "current": {},
                "description": "The Prometheus that scrapes the exporter.",
                "hide": 0,
                "includeAll": False,
                "label": "Data source",
                "multi": False,
                "name": "datasource",
                "options": [],
                "query": "prometheus",
                "refresh": 1,
                "regex": "",
                "skipUrlSync": False,
                "type": "datasource",
            },
            {
                "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "datasource": dict(DATASOURCE),
                "definition": project_query,
                "description": "SignalWire projects, as named in the exporter's configuration.",
                "hide": 0,
                "includeAll": True,
                "label": "Project",
                "multi": True,
                "name": "project",
                "options": [],
                "query": {
                    "qryType": 1,
                    "query": project_query,
                    "refId": "PrometheusVariableQueryEditor-VariableQuery",
                },
                "refresh": 2,
                "regex": "",
                "skipUrlSync": False,
                "sort": 1,
                "type": "query",
            },
        ]
    }


def build_dashboard() -> dict[str, Any]:
    return {
        "annotations": {"list": []},
        "description": (
            "SignalWire messaging from signalwire-exporter: volume, delivery and failures, "
            "error codes and their categories, countries, number groups, spend, segments, "
            "pending messages, late receipts and the exporter's own health."
        ),
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "liveNow": False,
        "panels": _layout(),
        "refresh": "1m",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["signalwire", "sms", "messaging", "prometheus"],
        "templating": _templating(),
        "time": {"from": "now-24h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": TITLE,
        "uid": UID,
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    return json.dumps(build_dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the JSON differs from the generated one"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run python3 {__file__}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
