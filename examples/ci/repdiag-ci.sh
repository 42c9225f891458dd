#!/usr/bin/env bash
# repdiag in any CI: analyse the model on the repository's prompts, compare with the committed
# baseline report, and write HTML + Markdown + JUnit for people and CI systems.
#
# Exit status (use it as the job's status):
#   0  no regression beyond the tolerances (or no baseline yet: the report is written, nothing compared)
#   1  regression: each one is listed with baseline, current and tolerance
#   2  bad input: unreadable or incompatible baseline (other schema major), unknown gated metric, ...
#   3  internal error
#
# Settings (environment variables, all optional):
#   REPDIAG          the repdiag command                     (default: repdiag)
#   MODEL            model id, folder or .gguf file          (default: default, the bundled model)
#   PROMPTS          prompts file (text or JSONL)            (default: prompts.txt if present, else the model's own)
#   BASELINE         the committed baseline report.json      (default: ci/repdiag-baseline.json)
#   OUT              output folder                           (default: repdiag-ci)
#   FAIL_ON          space-separated METRIC:TOL gates        (default: see below)
#   POLICY_MAP       space-separated BASE=CUR policy pairs   (default: none)
#   SEED             seed of the split, sampling and simulation (default: 0)
#   UPDATE_BASELINE  1: copy the new report over the baseline instead of comparing (then commit it)
# Arguments after the script name go to `repdiag analyze` (e.g. --mitigations greedy,top_p_0.9 --n-prompts 40).
#
# Outputs in $OUT: report.json (+ timings.json), report.md, report.html, compare.md, compare.json, junit.xml.
# On GitHub Actions, report and compare Markdown are appended to $GITHUB_STEP_SUMMARY and each
# regression becomes an ::error annotation.
set -euo pipefail

REPDIAG=${REPDIAG:-repdiag}
MODEL=${MODEL:-default}
BASELINE=${BASELINE:-ci/repdiag-baseline.json}
OUT=${OUT:-repdiag-ci}
SEED=${SEED:-0}
FAIL_ON=${FAIL_ON:-"rep_w16:+0.03 rep_r:+0.03 seq_rep_4:+0.03 nonterminated:+0.05"}
POLICY_MAP=${POLICY_MAP:-}
if [ -z "${PROMPTS:-}" ] && [ -f prompts.txt ]; then PROMPTS=prompts.txt; fi

mkdir -p "$OUT"
analyze=("$REPDIAG" analyze "$MODEL" --out "$OUT" --seed "$SEED")
if [ -n "${PROMPTS:-}" ]; then analyze+=(--prompts "$PROMPTS"); fi
echo "repdiag-ci: ${analyze[*]} $*" >&2
"${analyze[@]}" "$@"

report="$OUT/report.json"
# Markdown for reviewers (appended to $GITHUB_STEP_SUMMARY when set) and a self-contained HTML page.
"$REPDIAG" report "$report" --format md -o "$OUT/report.md"
"$REPDIAG" report "$report" --format html -o "$OUT/report.html"

if [ "${UPDATE_BASELINE:-0}" = "1" ]; then
  mkdir -p "$(dirname "$BASELINE")"
  cp "$report" "$BASELINE"
  echo "repdiag-ci: baseline updated: $BASELINE (commit it)" >&2
  exit 0
fi
if [ ! -f "$BASELINE" ]; then
  echo "repdiag-ci: no baseline at $BASELINE; nothing compared. Create one with UPDATE_BASELINE=1 and commit it." >&2
  exit 0
fi

compare=("$REPDIAG" compare "$BASELINE" "$report" --junit "$OUT/junit.xml")
for gate in $FAIL_ON; do compare+=(--fail-on "$gate"); done
for pair in $POLICY_MAP; do compare+=(--policy-map "$pair"); done

status=0
"${compare[@]}" --format md > "$OUT/compare.md" || status=$?
if [ "$status" -le 1 ]; then
  # the same comparison as JSON for machines (no second summary: only the first call appends to it)
  GITHUB_STEP_SUMMARY= GITHUB_ACTIONS= "${compare[@]}" --format json > "$OUT/compare.json" 2>/dev/null || true
  cat "$OUT/compare.md"
fi
case "$status" in
  0) echo "repdiag-ci: no regression" >&2 ;;
  1) echo "repdiag-ci: regression beyond tolerance (see $OUT/compare.md, $OUT/report.html)" >&2 ;;
  *) echo "repdiag-ci: compare failed with exit $status (bad input)" >&2 ;;
esac
exit "$status"
