#!/usr/bin/env bash
# The paper's experiment (Table I) as resumable stages:
#
#   data       prepare the TFDS dataset of every dataset (once)
#   teacher    the teacher, fully supervised
#   sweep      every distillation row once per factor of its default loss weight (seed 0, val
#              only, --sweep-factors); the best val mIoU is chosen before the seeds run
#              (python -m rkd_jax.sweep: <out>/sweep.json, sweep.md) and the later stages
#              train with the chosen weights
#   student    the student baseline (no distillation)
#   distill    the paper: student + L_VL + L_C from the trained teacher
#   ablations  L_VL only (lambda_channel=0), L_C only (lambda_vl=0)
#   baselines  distillation baselines: pixel-wise logit KD, SKD pair-wise, CWD, ICKD
#   lite0      the EfficientNet-Lite0 student (offline ImageNet weights), without and with
#              distillation (and EfficientNet-B0 with --efficientnet-b0 FILE, paper setting)
#   eval       re-score (--mode=eval) every trained run whose results files are missing
#   report     results/table1.md + table1_miou.png (python -m rkd_jax.table) and the model
#              report (python -m rkd_jax.report) at the paper and the miniature sizes
#
# Every training run is `python -m rkd_jax.main` in <root>/<dataset>/seed<k>/<run> (the teacher:
# one run per dataset, <root>/<dataset>/teacher, shared by every seed's students) and is
# skipped when all its results files exist; a killed run resumes from its last checkpoint when
# launch.sh is started again. Every finished run's small files (results/*.json, config.json,
# metrics.jsonl) are copied to <out>/runs/<same path>, which the report reads: commit them and
# a later invocation on another machine skips those runs too (the teacher is retrained, same
# seed, only when a run still to train needs its checkpoint). See docs/table1.md and --help.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch.sh [options] [--config.FIELD=VALUE ...]

  --setting S         miniature (default: the embedded data, configs/distill.py),
                      tiny (seconds-long smoke runs, used by the tests) or paper
  --paper             same as --setting paper (real RefCOCO/RefCOCO+, the paper's settings)
  --refer-root DIR    REFER root (paper setting; required there): DIR/refcoco, DIR/refcoco+,
                      DIR/images/mscoco/images/train2014
  --bert-dir DIR      Hugging Face bert-base-uncased directory (paper setting; required there)
  --resnet101 FILE    ImageNet ResNet-101 weights for the teacher (torchvision/timm .pth)
  --resnet18 FILE     ImageNet ResNet-18 weights for the ResNet-18 students
  --efficientnet-b0 FILE
                      ImageNet EfficientNet-B0 weights: adds the B0 student runs (paper)
  --seeds N           seeds 0..N-1 of every run (default 3)
  --sweep-factors "F ..."
                      factors of each method's default loss weight tried by the sweep stage
                      (default "0.1 1 10"; "" skips the sweep: the default weights are used;
                      tiny setting: "")
  --sweep-rows "R ..."
                      the distillation rows the sweep stage tunes (default: all of them:
                      distill vl_only channel_only logit_kd skd cwd ickd lite0_distill); a row
                      left out keeps its default weights
  --rows "R ..."      train (and score) only these student rows in the training stages
                      (default: all of them: student distill vl_only channel_only logit_kd
                      skd cwd ickd lite0 lite0_distill, and b0 b0_distill with
                      --efficientnet-b0); the teacher always trains, and the sweep tunes only
                      the chosen rows unless --sweep-rows says otherwise
  --root DIR          run directory (default runs/table1; runs/table1_paper for --paper,
                      runs/table1_tiny for --setting tiny)
  --out DIR           where the report goes (default results; results/paper for --paper,
                      <root>/report for --setting tiny)
  --stages "S ..."    run only these stages, in the fixed order (default: all)
  --datasets "D ..."  datasets (default "refcoco refcoco+"; "refcoco" for --setting tiny)
  --eval-splits "S ..."
                      splits scored after training (default "val testA testB"; "val" for tiny)
  --jobs N            train N runs of a stage at once, each pinned (taskset) to its own share
                      of the cores this process may use (default 1: one after the other; not
                      with --paper, which trains on one accelerator); the stage's last run
                      gets every core. For CPUs whose cores one run leaves partly idle; on
                      2 cores it measured no gain (docs/table1.md)
  --verbose           stream every run's output (default: into <root>/logs/, tail on failure)
  --config.F=V        passed to every python -m rkd_jax.main call (e.g. --config.train.epochs=4)

Environment: PYTHON (default python), JAX_COMPILATION_CACHE_DIR (default <root>/jax_cache),
TEXT_CACHE_DIR (frozen text features shared by the runs; default <root>/text_cache).
EOF
}

die() {
  echo "launch.sh: error: $*" >&2
  exit 2
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-python}
ALL_STAGES=(data teacher sweep student distill ablations baselines lite0 eval report)

SETTING=miniature
SEEDS=3
ROOT=""
OUT=""
STAGES_ARG=""
DATASETS_ARG=""
SPLITS_ARG=""
REFER_ROOT=""
BERT_DIR=""
RESNET101=""
RESNET18=""
EFFNET_B0=""
VERBOSE=0
JOBS=1
EXTRA=()
SWEEP_ARG="unset"
SWEEP_ROWS_ARG=""
ROWS_ARG=""

# Paths given on the command line are relative to the caller's directory.
abspath() { realpath -m -- "$1"; }

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --paper) SETTING=paper ;;
    --setting) need_value "$@"; SETTING=$2; shift ;;
    --setting=*) SETTING=${1#*=} ;;
    --refer-root) need_value "$@"; REFER_ROOT=$(abspath "$2"); shift ;;
    --bert-dir) need_value "$@"; BERT_DIR=$(abspath "$2"); shift ;;
    --resnet101) need_value "$@"; RESNET101=$(abspath "$2"); shift ;;
    --resnet18) need_value "$@"; RESNET18=$(abspath "$2"); shift ;;
    --efficientnet-b0) need_value "$@"; EFFNET_B0=$(abspath "$2"); shift ;;
    --seeds) need_value "$@"; SEEDS=$2; shift ;;
    --sweep-factors) [[ $# -ge 2 ]] || die "$1 needs a value"; SWEEP_ARG=$2; shift ;;
    --sweep-rows) need_value "$@"; SWEEP_ROWS_ARG=$2; shift ;;
    --rows) need_value "$@"; ROWS_ARG=$2; shift ;;
    --root) need_value "$@"; ROOT=$(abspath "$2"); shift ;;
    --out) need_value "$@"; OUT=$(abspath "$2"); shift ;;
    --stages) need_value "$@"; STAGES_ARG=$2; shift ;;
    --datasets) need_value "$@"; DATASETS_ARG=$2; shift ;;
    --eval-splits) need_value "$@"; SPLITS_ARG=$2; shift ;;
    --jobs) need_value "$@"; JOBS=$2; shift ;;
    --verbose) VERBOSE=1 ;;
    --config.*=*)
      case "${1%%=*}" in
        --config.seed) die "$1: launch.sh sets config.seed itself; use --seeds N" ;;
        --config.mode | --config.teacher_checkpoint)
          die "$1: launch.sh sets ${1%%=*} per stage" ;;
        --config.data.dataset) die "$1: use --datasets \"refcoco refcoco+\"" ;;
        --config.data.eval_splits) die "$1: use --eval-splits \"val testA testB\"" ;;
        --config.data.root) die "$1: use --paper --refer-root DIR" ;;
      esac
      EXTRA+=("$1") ;;
    --config.*) die "$1: write config overrides as --config.FIELD=VALUE (one argument)" ;;
    *) die "unknown option $1 (see launch.sh --help)" ;;
  esac
  shift
done

[[ $SEEDS =~ ^[1-9][0-9]*$ ]] || die "--seeds $SEEDS: expected a positive integer"
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "--jobs $JOBS: expected a positive integer"

# Per setting: the config variant of the ResNet runs, the Lite0 runs' variant and overrides,
# run-size overrides, defaults for datasets, splits, root and out.
COMMON=()     # every main call
R18_OVR=()    # the ResNet-18 student runs
LITE_OVR=()   # the Lite0 student runs
case "$SETTING" in
  miniature)
    VARIANT=""
    LITE_VARIANT="lite0"
    DEF_DATASETS="refcoco refcoco+"
    DEF_SPLITS="val testA testB"
    DEF_ROOT="$REPO/runs/table1"
    DEF_OUT="$REPO/results"
    REPORTS=("miniature:configs/distill.py" "miniature_lite0:configs/distill.py:lite0"
             "paper:configs/distill.py:paper" "paper_b0:configs/distill.py:paper_b0")
    REPORT_LATENCY=1
    # Trained to convergence (docs/table1.md, "Protocol"): 1,600 generated images per dataset
    # (~3,600 training sentences, ~770 val sentences). The teacher (refcoco, seed 0) gains
    # under a point per epoch after epoch 10 at lr 1e-3; so the one teacher per dataset trains
    # 24 epochs (x0.1 at 16: the teacher of refcoco, seed 0, gained 0.5 over epochs 19-24) and
    # every student row 12 (x0.1 at 8, the same two thirds: with the decay at 9 a distilled
    # student still gained 3 points over epochs 10-12); the report's plateau test checks each
    # row. Only teacher runs read config.teacher_train. The Lite0 rows (an ImageNet backbone at
    # 0.3 of the lr, the lite0 variant; still gaining 0.25 val points per epoch at lr 1e-4
    # after 24 epochs at the full lr) train the same 12 epochs with a second decay: x0.1 at 8
    # and at 10 (docs/table1.md, "The Lite0 schedule").
    # The table trains its student-alone rows itself (config.student_alone off).
    COMMON=(--config.run.cache_teacher_targets=True --config.data.synthetic_num_images=1600
            --config.student_alone=False
            --config.teacher_train.epochs=24 "--config.teacher_train.lr_decay_epochs=(16,)"
            --config.train.epochs=12)
    R18_OVR=("--config.train.lr_decay_epochs=(8,)")
    LITE_OVR=("--config.train.lr_decay_epochs=(8,10)")
    ;;
  tiny)
    VARIANT="tiny"
    LITE_VARIANT="tiny"
    LITE_OVR=(--config.student.backbone=efficientnet_lite0 --config.student.backbone_weights=offline)
    COMMON=(--config.run.max_steps=2 --config.run.max_eval_examples=8
            --config.run.cache_teacher_targets=True)
    DEF_DATASETS="refcoco"
    DEF_SPLITS="val"
    DEF_ROOT="$REPO/runs/table1_tiny"
    DEF_OUT=""  # <root>/report
    REPORTS=("tiny:configs/distill.py:tiny")
    REPORT_LATENCY=0
    ;;
  paper)
    [[ -n $REFER_ROOT ]] || die "--paper needs --refer-root DIR (the REFER layout of RefCOCO)"
    [[ -d $REFER_ROOT ]] || die "--refer-root $REFER_ROOT: not a directory"
    [[ -n $BERT_DIR ]] || die "--paper needs --bert-dir DIR (bert-base-uncased, Hugging Face layout)"
    [[ -d $BERT_DIR ]] || die "--bert-dir $BERT_DIR: not a directory"
    VARIANT="paper"
    LITE_VARIANT="paper"
    COMMON=(--config.data.root="$REFER_ROOT" --config.teacher.text_encoder_dir="$BERT_DIR"
            --config.student.text_encoder_dir="$BERT_DIR")
    LITE_OVR=(--config.student.backbone=efficientnet_lite0 --config.student.backbone_weights=offline)
    DEF_DATASETS="refcoco refcoco+"
    DEF_SPLITS="val testA testB"
    DEF_ROOT="$REPO/runs/table1_paper"
    DEF_OUT="$REPO/results/paper"
    REPORTS=("paper:configs/distill.py:paper" "paper_b0:configs/distill.py:paper_b0"
             "miniature:configs/distill.py" "miniature_lite0:configs/distill.py:lite0")
    REPORT_LATENCY=1
    ;;
  *) die "--setting $SETTING: expected miniature, tiny or paper" ;;
esac
for f in "$RESNET101" "$RESNET18" "$EFFNET_B0"; do
  [[ -z $f || -f $f ]] || die "weights file $f: not found"
done
if [[ $SETTING != paper && -n "$REFER_ROOT$BERT_DIR$RESNET101$RESNET18$EFFNET_B0" ]]; then
  die "--refer-root, --bert-dir and the weight files belong to --paper"
fi
[[ -n $RESNET101 ]] && COMMON+=(--config.teacher.backbone_weights="$RESNET101")
[[ -n $RESNET18 ]] && R18_OVR+=(--config.student.backbone_weights="$RESNET18")
if [[ $SETTING == paper && -z "$RESNET101$RESNET18" ]]; then
  echo "launch.sh: warning: no --resnet101/--resnet18 weights: backbones start from random" \
    "initialisation (the paper starts from ImageNet)" >&2
fi

if [[ $SWEEP_ARG == unset ]]; then
  if [[ $SETTING == tiny ]]; then SWEEP_ARG=""; else SWEEP_ARG="0.1 1 10"; fi
fi
read -r -a SWEEP_FACTORS <<<"$SWEEP_ARG"
for f in "${SWEEP_FACTORS[@]}"; do
  [[ $f =~ ^[0-9]*\.?[0-9]+$ ]] || die "--sweep-factors: $f is not a positive number"
done
ALL_ROWS=(student distill vl_only channel_only logit_kd skd cwd ickd lite0 lite0_distill)
[[ -n $EFFNET_B0 ]] && ALL_ROWS+=(b0 b0_distill)
read -r -a ROWS <<<"${ROWS_ARG:-${ALL_ROWS[*]}}"
for r in "${ROWS[@]}"; do
  [[ " ${ALL_ROWS[*]} " == *" $r "* ]] || die "--rows: unknown row $r (valid: ${ALL_ROWS[*]})"
done
ALL_SWEEP_ROWS=(distill vl_only channel_only logit_kd skd cwd ickd lite0_distill)
if [[ -z $SWEEP_ROWS_ARG ]]; then  # the swept rows among the chosen ones
  for r in "${ALL_SWEEP_ROWS[@]}"; do
    [[ " ${ROWS[*]} " == *" $r "* ]] && SWEEP_ROWS_ARG+="$r "
  done
  [[ -n $SWEEP_ROWS_ARG ]] || SWEEP_ROWS_ARG=" "  # none of them: nothing to tune
fi
read -r -a SWEEP_ROWS <<<"$SWEEP_ROWS_ARG"
for r in "${SWEEP_ROWS[@]}"; do
  [[ " ${ALL_SWEEP_ROWS[*]} " == *" $r "* ]] ||
    die "--sweep-rows: unknown row $r (valid: ${ALL_SWEEP_ROWS[*]})"
done

ROOT=${ROOT:-$DEF_ROOT}
OUT=${OUT:-${DEF_OUT:-$ROOT/report}}
read -r -a DATASETS <<<"${DATASETS_ARG:-$DEF_DATASETS}"
read -r -a SPLITS <<<"${SPLITS_ARG:-$DEF_SPLITS}"
[[ ${#DATASETS[@]} -gt 0 ]] || die "--datasets: empty"
[[ ${#SPLITS[@]} -gt 0 ]] || die "--eval-splits: empty"
for d in "${DATASETS[@]}"; do
  [[ $d == refcoco || $d == refcoco+ ]] || die "--datasets: $d (expected refcoco and/or refcoco+)"
done
for s in "${SPLITS[@]}"; do
  [[ $s =~ ^[A-Za-z0-9_]+$ ]] || die "--eval-splits: $s is not a split name"
done
SPLITS_TUPLE="($(printf "'%s'," "${SPLITS[@]}"))"

# --jobs N: the cores of each job slot (taskset -c lists), this process's cores split evenly.
JOB_CPUS=()
if ((JOBS > 1)); then
  [[ $SETTING != paper ]] || die "--jobs $JOBS: the paper setting trains on one accelerator; use --jobs 1"
  command -v taskset >/dev/null || die "--jobs $JOBS needs taskset (util-linux) to pin each run to its cores"
  mapfile -t JOB_CPUS < <("$PY" - "$JOBS" <<'PYEOF'
import os
import sys

cpus, jobs = sorted(os.sched_getaffinity(0)), int(sys.argv[1])
if jobs > len(cpus):
    sys.exit(f"launch.sh: error: --jobs {jobs}: this process may use {len(cpus)} cores, one per job at least")
per = len(cpus) // jobs
for i in range(jobs):
    print(",".join(str(c) for c in cpus[i * per:(i + 1) * per]))
PYEOF
  )
  ((${#JOB_CPUS[@]} == JOBS)) || exit 2
fi

if [[ -n $STAGES_ARG ]]; then
  read -r -a WANT <<<"$STAGES_ARG"
  for s in "${WANT[@]}"; do
    [[ " ${ALL_STAGES[*]} " == *" $s "* ]] || die "--stages: unknown stage $s (valid: ${ALL_STAGES[*]})"
  done
else
  WANT=("${ALL_STAGES[@]}")
fi
wanted() { [[ " ${WANT[*]} " == *" $1 "* ]]; }

# One root holds one setting: a miniature run must never pass for a paper run.
mkdir -p "$ROOT/logs" "$OUT"
if [[ -f $ROOT/launch.json ]] && ! grep -q "\"setting\": \"$SETTING\"" "$ROOT/launch.json"; then
  die "$ROOT holds another setting ($(tr -d '\n' <"$ROOT/launch.json")); use another --root"
fi
LAUNCH_JSON=$(printf '{"setting": "%s", "seeds": %d, "datasets": [%s], "eval_splits": [%s]}' \
  "$SETTING" "$SEEDS" "$(printf '"%s", ' "${DATASETS[@]}" | sed 's/, $//')" \
  "$(printf '"%s", ' "${SPLITS[@]}" | sed 's/, $//')")
# Rewritten only when it changes: the report stage regenerates the table when a .json is newer.
if [[ ! -f $ROOT/launch.json || $(cat "$ROOT/launch.json") != "$LAUNCH_JSON" ]]; then
  echo "$LAUNCH_JSON" >"$ROOT/launch.json"
fi

# Compiled programs are shared by the ~10 runs per seed (same shapes, same models).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$ROOT/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=${JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES:-0}
# So are the frozen text encoders' features of the training sentences (config.run.text_cache_dir;
# keyed by a fingerprint of weights, config, sentences, dtype, backend and jax version).
TEXT_CACHE_DIR=${TEXT_CACHE_DIR:-$ROOT/text_cache}
cd "$REPO"

STAGE=setup
trap 'echo "launch.sh: FAILED in stage $STAGE (line $LINENO)" >&2' ERR

# run_spec RUN -> CFG (config file:variant), RUN_OVR (overrides), TEACHER (1: needs the teacher).
run_spec() {
  TEACHER=0
  case "$1" in
    teacher) CFG="configs/teacher.py:$VARIANT"; RUN_OVR=() ;;
    student) CFG="configs/student.py:$VARIANT"; RUN_OVR=("${R18_OVR[@]}") ;;
    distill) CFG="configs/distill.py:$VARIANT"; RUN_OVR=("${R18_OVR[@]}"); TEACHER=1 ;;
    vl_only)
      CFG="configs/distill.py:$VARIANT"; TEACHER=1
      RUN_OVR=("${R18_OVR[@]}" --config.distill.method=vl_channel --config.distill.lambda_channel=0.0) ;;
    channel_only)
      CFG="configs/distill.py:$VARIANT"; TEACHER=1
      RUN_OVR=("${R18_OVR[@]}" --config.distill.method=vl_channel --config.distill.lambda_vl=0.0) ;;
    logit_kd | skd | cwd | ickd)
      CFG="configs/distill.py:$VARIANT"; TEACHER=1
      RUN_OVR=("${R18_OVR[@]}" --config.distill.method="$1") ;;
    lite0) CFG="configs/student.py:$LITE_VARIANT"; RUN_OVR=("${LITE_OVR[@]}") ;;
    lite0_distill) CFG="configs/distill.py:$LITE_VARIANT"; RUN_OVR=("${LITE_OVR[@]}"); TEACHER=1 ;;
    b0) CFG="configs/student.py:paper_b0"; RUN_OVR=(--config.student.backbone_weights="$EFFNET_B0") ;;
    b0_distill)
      CFG="configs/distill.py:paper_b0"; TEACHER=1
      RUN_OVR=(--config.student.backbone_weights="$EFFNET_B0") ;;
    *) die "internal: unknown run $1" ;;
  esac
  CFG=${CFG%:}
}

# stage_runs STAGE: the stage's runs among --rows (the teacher always).
stage_runs() {
  local r
  for r in $(all_stage_runs "$1"); do
    [[ $r == teacher || " ${ROWS[*]} " == *" $r "* ]] && echo "$r"
  done
  return 0
}

all_stage_runs() {
  case "$1" in
    teacher) echo teacher ;;
    student) echo student ;;
    distill) echo distill ;;
    ablations) echo vl_only channel_only ;;
    baselines) echo logit_kd skd cwd ickd ;;
    lite0) echo lite0 lite0_distill; [[ -n $EFFNET_B0 ]] && echo b0 b0_distill; true ;;
  esac
}

ARCHIVE="$OUT/runs"  # the small files of every finished run, mirrored from $ROOT

# results_complete DIR DATASET [SPLIT...]: every results file exists, in the run directory or in
# its archived copy (results committed from an earlier invocation, maybe on another machine).
results_complete() {
  local dir=$1 ds=$2 s rel
  shift 2
  local splits=("$@")
  ((${#splits[@]})) || splits=("${SPLITS[@]}")
  rel=${dir#"$ROOT"/}
  for s in "${splits[@]}"; do
    [[ -f $dir/results/${ds}_$s.json || -f $ARCHIVE/$rel/results/${ds}_$s.json ]] || return 1
  done
}

# archive_run DIR: copy a finished run's small files to $ARCHIVE (never its checkpoints).
archive_run() {
  local dir=$1 rel dest f
  rel=${dir#"$ROOT"/}
  dest=$ARCHIVE/$rel
  mkdir -p "$dest/results"
  # The archive is committed: the run's config names paths under the root as <root>/...
  [[ -f $dir/config.json ]] &&
    "$PY" -c 'import sys; s = open(sys.argv[1]).read(); open(sys.argv[2], "w").write(s.replace(sys.argv[3] + "/", "<root>/"))' \
      "$dir/config.json" "$dest/config.json.tmp" "$ROOT" && mv "$dest/config.json.tmp" "$dest/config.json"
  [[ -f $dir/metrics.jsonl ]] && cp "$dir/metrics.jsonl" "$dest/metrics.jsonl.tmp" &&
    mv "$dest/metrics.jsonl.tmp" "$dest/metrics.jsonl"
  for f in "$dir"/results/*.json; do
    [[ -f $f ]] && cp "$f" "$dest/results/.tmp" && mv "$dest/results/.tmp" "$dest/results/$(basename "$f")"
  done
  return 0
}

record_time() {  # STAGE RUN SECONDS STATUS
  local line
  line=$(printf '%s\t%s\t%s\t%s\t%s' "$1" "$2" "$3" "$4" "$(date -u +%Y-%m-%dT%H:%M:%SZ)")
  echo "$line" >>"$ROOT/stage_times.tsv"
  mkdir -p "$ARCHIVE"
  echo "$line" >>"$ARCHIVE/stage_times.tsv"
}

# run_main STAGE NAME LOG ARGS...: one python -m rkd_jax.main, its output into LOG.
run_main() {
  local stage=$1 name=$2 log=$3 rc=0 t0=$SECONDS
  shift 3
  {
    echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf '%q ' "$PY" -m rkd_jax.main "$@"
    echo
  } >>"$log"
  if ((VERBOSE)); then
    ${PIN[@]+"${PIN[@]}"} "$PY" -m rkd_jax.main "$@" 2>&1 | tee -a "$log" || rc=$?
  else
    ${PIN[@]+"${PIN[@]}"} "$PY" -m rkd_jax.main "$@" >>"$log" 2>&1 || rc=$?
  fi
  if ((rc != 0)); then
    record_time "$stage" "$name" $((SECONDS - t0)) "failed($rc)"
    tail -n 30 "$log" >&2 || true
    echo "launch.sh: FAILED in stage $stage: $name exited with $rc; full log: $log" >&2
    exit 1
  fi
  record_time "$stage" "$name" $((SECONDS - t0)) ok
  RUN_SECONDS=$((SECONDS - t0))
}

# Job slots (--jobs N): start_job runs a command now (N = 1) or queues it; a queued job starts
# in the background in a free slot when the next one is queued, pinned to the slot's cores (PIN,
# which run_main puts before python). wait_jobs starts the stage's last job on every core (the
# other slots' runs are ending; it then has the machine to itself), waits for every job and
# stops launch.sh if one failed. After a failure no new job starts; the running ones finish and
# archive their results, as the runs before a failure do without --jobs.
PIN=()
SLOT_PID=()
SLOT_NAME=()
JOB_FAILED=()
QUEUED=""
QUEUED_NAME=""

kill_tree() {  # PID: the process and its descendants
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do kill_tree "$child"; done
  kill "$1" 2>/dev/null || true
}

reap_slot() {  # SLOT: collect its finished job's status
  local rc=0
  wait "${SLOT_PID[$1]}" || rc=$?
  ((rc == 0)) || JOB_FAILED+=("${SLOT_NAME[$1]}")
  SLOT_PID[$1]=""
}

# free_slot -> SLOT: an idle slot, after waiting for a job to finish if every slot is busy.
free_slot() {
  local i
  while :; do
    for ((i = 0; i < JOBS; i++)); do
      if [[ -z ${SLOT_PID[i]:-} ]]; then SLOT=$i; return; fi
      if ! kill -0 "${SLOT_PID[i]}" 2>/dev/null; then reap_slot "$i"; SLOT=$i; return; fi
    done
    sleep 2
  done
}

wait_jobs() {
  local i
  [[ -z $QUEUED ]] || dispatch 0
  for ((i = 0; i < JOBS; i++)); do
    [[ -n ${SLOT_PID[i]:-} ]] && reap_slot "$i"
  done
  if ((${#JOB_FAILED[@]})); then
    echo "launch.sh: FAILED in stage $STAGE: ${JOB_FAILED[*]} failed (see above); the runs" \
      "beside them finished" >&2
    exit 1
  fi
  return 0
}

start_job() {  # NAME CMD...
  if ((JOBS == 1)); then
    shift
    "$@"
    return
  fi
  [[ -z $QUEUED ]] || dispatch 1
  QUEUED_NAME=$1
  shift
  QUEUED=$(printf '%q ' "$@")
}

dispatch() {  # PINNED: start the queued job in a free slot (1: on the slot's cores; 0: on all)
  local cmd=$QUEUED
  QUEUED=""
  free_slot
  ((${#JOB_FAILED[@]} == 0)) || wait_jobs
  (
    if (($1)); then PIN=(taskset -c "${JOB_CPUS[SLOT]}"); fi
    eval "$cmd"
  ) &
  SLOT_PID[SLOT]=$!
  SLOT_NAME[SLOT]=$QUEUED_NAME
}

if ((JOBS > 1)); then
  trap 'for p in "${SLOT_PID[@]}"; do [[ -n $p ]] && kill_tree "$p"; done; exit 130' INT TERM
fi

# train_run STAGE NAME DIR ARGS...: one training run (python -m rkd_jax.main ARGS in DIR),
# then its small files archived.
train_run() {
  local stage=$1 name=$2 dir=$3
  shift 3
  echo "run $stage $name (log: $ROOT/logs/${name//\//_}.log)"
  run_main "$stage" "$name" "$ROOT/logs/${name//\//_}.log" "$@" --workdir="$dir"
  touch "$dir/.trained"
  archive_run "$dir"
  echo "done $stage $name in ${RUN_SECONDS}s: $dir/results/"
}

args_for() {  # RUN DATASET SEED [WEIGHTS] -> ARGS; WEIGHTS=chosen: the sweep's choice
  run_spec "$1"
  ARGS=(--config="$CFG" "${COMMON[@]}" "${RUN_OVR[@]}" --config.seed="$3"
        --config.data.dataset="$2" --config.data.eval_splits="$SPLITS_TUPLE"
        --config.run.text_cache_dir="$TEXT_CACHE_DIR" "${EXTRA[@]}")
  if [[ ${4:-} == chosen && " ${SWEEP_ROWS[*]} " == *" $1 "* && -f $OUT/sweep.json ]]; then
    local chosen
    chosen=$("$PY" -m rkd_jax.sweep chosen --out "$OUT" --dataset "$2" "$1") ||
      die "reading the sweep's choice for $2 $1 from $OUT/sweep.json failed"
    [[ -n $chosen ]] && mapfile -t -O "${#ARGS[@]}" ARGS <<<"$chosen"
  fi
  return 0
}

# ensure_teacher DATASET: the teacher's checkpoint for a run that still has to train (its
# results may be archived while the checkpoint is gone: retrain it, same seed, same config).
ensure_teacher() {
  local tdir="$ROOT/$1/teacher"
  # Trained: its checkpoint and its own results (written when its schedule ends). A teacher
  # killed mid-schedule has checkpoints but no results: it resumes to its end here, so that
  # no student ever distils a half-trained teacher.
  has_checkpoint "$tdir" && [[ -f $tdir/results/${1}_val.json ]] && return 0
  if has_checkpoint "$tdir"; then
    echo "run teacher $1/teacher to its end: it has checkpoints but no results (stopped early)"
  else
    results_complete "$tdir" "$1" ||
      { echo "launch.sh: FAILED: $1 runs need the trained teacher $tdir (run the teacher" \
          "stage first)" >&2; exit 1; }
    echo "run teacher $1/teacher again: its results are archived but its checkpoint is not here"
  fi
  args_for teacher "$1" 0
  run_main teacher "$1/teacher" "$ROOT/logs/${1}_teacher.log" "${ARGS[@]}" --workdir="$tdir"
  # Same seed and config, but another machine or code version may sum in another order: say
  # how far the retrained teacher (the one the later runs distil) is from the archived one.
  [[ -f $ARCHIVE/$1/teacher/results/${1}_val.json ]] &&
    "$PY" - "$tdir/results/${1}_val.json" "$ARCHIVE/$1/teacher/results/${1}_val.json" <<'PYEOF' || true
import json, sys
new, old = (100 * json.load(open(f))["metrics"]["network"]["mIoU"] for f in sys.argv[1:3])
print(f"teacher retrained: val mIoU {new:.2f} (the archived run: {old:.2f}; the table reports the archived one)")
PYEOF
}

# reuse_sweep_run RUN DATASET DIR: seed 0 of a swept row trains exactly the sweep's run of the
# chosen factor (same config, seed and weights; measured to reproduce it to the last digit), so
# its checkpoints start DIR: main then finds the schedule done and only scores every split.
reuse_sweep_run() {
  local run src
  [[ " ${SWEEP_ROWS[*]} " == *" $1 "* && ! -d $3/checkpoints ]] || return 0
  run=$("$PY" -m rkd_jax.sweep chosen-run --out "$OUT" --dataset "$2" "$1") ||
    die "reading the sweep's choice for $2 $1 from $OUT/sweep.json failed"
  src="$ROOT/$2/sweep/$run"
  [[ -n $run ]] && has_checkpoint "$src" || return 0
  echo "seed 0 of $2 $1 is the sweep's run $run: its checkpoints are reused ($src)"
  mkdir -p "$3"
  cp -a "$src/checkpoints" "$3/checkpoints"
  [[ -f $src/metrics.jsonl ]] && cp "$src/metrics.jsonl" "$3/metrics.jsonl"
  return 0
}

# run_dir RUN DATASET SEED -> DIR, NAME. The teacher is one run per dataset (seed 0), shared by
# every seed's students, as the paper distils one teacher: <root>/<dataset>/teacher.
run_dir() {
  if [[ $1 == teacher ]]; then
    DIR="$ROOT/$2/teacher"
    NAME="$2/teacher"
  else
    DIR="$ROOT/$2/seed$3/$1"
    NAME="$2/seed$3/$1"
  fi
}

# seeds_of STAGE: how many seeds the stage trains (the teacher: one).
seeds_of() { if [[ $1 == teacher ]]; then echo 1; else echo "$SEEDS"; fi; }

train_stage() {
  local stage=$1 run ds k dir name
  for ds in "${DATASETS[@]}"; do
    for ((k = 0; k < $(seeds_of "$stage"); k++)); do
      for run in $(stage_runs "$stage"); do
        run_dir "$run" "$ds" "$k"
        dir=$DIR
        name=$NAME
        if results_complete "$dir" "$ds"; then
          echo "skip $stage $name: results exist"
          continue
        fi
        args_for "$run" "$ds" "$k" chosen
        if ((TEACHER)); then
          local tdir="$ROOT/$ds/teacher"
          ensure_teacher "$ds"
          args_for "$run" "$ds" "$k" chosen
          ARGS+=(--config.teacher_checkpoint="$tdir")
        fi
        ((k == 0)) && reuse_sweep_run "$run" "$ds" "$dir"
        start_job "$name" train_run "$stage" "$name" "$dir" "${ARGS[@]}"
      done
    done
  done
  wait_jobs
  if [[ $stage == teacher ]]; then
    echo "stage teacher: results in $ROOT/<dataset>/teacher/results/"
  elif [[ -z $(stage_runs "$stage") ]]; then
    echo "stage $stage: none of its rows is among --rows (${ROWS[*]})"
  else
    echo "stage $stage: results in $ROOT/<dataset>/seed<k>/{$(stage_runs "$stage" | tr '\n' ' ' |
      sed 's/ $//; s/ /,/g')}/results/"
  fi
}

sweep_stage() {
  local ds row f dir name
  if ((${#SWEEP_FACTORS[@]} == 0)); then
    echo "stage sweep: no --sweep-factors: the table's runs use the default weights"
    return
  fi
  if ((${#SWEEP_ROWS[@]} == 0)); then
    echo "stage sweep: none of the swept rows is among --rows (${ROWS[*]})"
    return
  fi
  for ds in "${DATASETS[@]}"; do
    for row in "${SWEEP_ROWS[@]}"; do
      for f in "${SWEEP_FACTORS[@]}"; do
        dir="$ROOT/$ds/sweep/$("$PY" -m rkd_jax.sweep run-name "$row" "$f")"
        name=${dir#"$ROOT"/}
        if results_complete "$dir" "$ds" val; then
          echo "skip sweep $name: results exist"
          continue
        fi
        ensure_teacher "$ds"
        args_for "$row" "$ds" 0
        mapfile -t -O "${#ARGS[@]}" ARGS < <("$PY" -m rkd_jax.sweep overrides "$row" "$f")
        ARGS+=(--config.teacher_checkpoint="$ROOT/$ds/teacher" "--config.data.eval_splits=('val',)")
        start_job "$name" train_run sweep "$name" "$dir" "${ARGS[@]}"
      done
    done
  done
  wait_jobs
  "$PY" -m rkd_jax.sweep choose --root "$ARCHIVE" --out "$OUT" --datasets "${DATASETS[@]}" \
    --factors "${SWEEP_FACTORS[@]}" ||
    { echo "launch.sh: FAILED in stage sweep: python -m rkd_jax.sweep choose" >&2; exit 1; }
  echo "stage sweep: $OUT/sweep.md, $OUT/sweep.json (the later stages train with its choice)"
}

data_stage() {
  local ds
  for ds in "${DATASETS[@]}"; do
    run_spec teacher
    # Same config (and overrides) as the runs, so the data they read is the data prepared here.
    "$PY" - "$ROOT/$ds/data.json" --config="$CFG" "${COMMON[@]}" --config.data.dataset="$ds" \
      "${EXTRA[@]}" <<'PY' || { echo "launch.sh: FAILED in stage data ($ds)" >&2; exit 1; }
import json
import sys
import time
from pathlib import Path

from absl import flags
from ml_collections import config_flags

marker = Path(sys.argv.pop(1))
config_flag = config_flags.DEFINE_config_file("config")
flags.FLAGS(sys.argv)
data = config_flag.value.data
want = json.loads(json.dumps(data.to_dict(), default=list))
name = f"{data.dataset}"
try:
    done = json.loads(marker.read_text())
except (OSError, ValueError):
    done = {}
if done.get("data") == want:
    print(f"skip data {name}: results exist ({marker})")
    sys.exit(0)
from rkd_jax.data import prepare, tfds_builder  # noqa: E402

t0 = time.perf_counter()
data_dir, tfds_name = prepare.ensure_prepared(data)
b = tfds_builder.builder(data_dir, data.dataset, data.split_by)
splits = {k: int(v.num_examples) for k, v in sorted(b.info.splits.items())}
marker.parent.mkdir(parents=True, exist_ok=True)
payload = {"data": want, "tfds_data_dir": data_dir, "tfds_name": tfds_name, "splits": splits,
           "seconds": time.perf_counter() - t0}
marker.write_text(json.dumps(payload, indent=2) + "\n")
print(f"data {name}: {tfds_name} in {data_dir} ({payload['seconds']:.1f}s); examples per split: "
      + ", ".join(f"{k} {v}" for k, v in splits.items()))
PY
  done
  echo "stage data: $ROOT/<dataset>/data.json (where the prepared TFDS dataset lives)"
}

has_checkpoint() {
  local d
  for d in "$1"/checkpoints/*/; do
    [[ $(basename "$d") =~ ^[0-9]+$ ]] && return 0
  done
  return 1
}

eval_stage() {
  local stage run ds k dir name
  for ds in "${DATASETS[@]}"; do
    for ((k = 0; k < SEEDS; k++)); do
      for stage in teacher student distill ablations baselines lite0; do
        ((k > 0)) && [[ $stage == teacher ]] && continue
        for run in $(stage_runs "$stage"); do
          run_dir "$run" "$ds" "$k"
          dir=$DIR
          name=$NAME
          if results_complete "$dir" "$ds"; then
            echo "skip eval $name: results exist"
          elif [[ -f $dir/.trained ]] && has_checkpoint "$dir"; then
            args_for "$run" "$ds" "$k" chosen
            echo "run eval $name (log: $ROOT/logs/${name//\//_}.log)"
            run_main eval "$name" "$ROOT/logs/${name//\//_}.log" "${ARGS[@]}" --workdir="$dir" \
              --mode=eval
            archive_run "$dir"
            echo "done eval $name in ${RUN_SECONDS}s: $dir/results/"
          elif [[ -d $dir ]]; then
            echo "eval $name: training not finished; resume it with --stages $stage"
          else
            echo "eval $name: not trained (stage $stage)"
          fi
        done
      done
    done
  done
  echo "stage eval: results in $ROOT/<dataset>/seed<k>/<run>/results/"
}

report_stage() {
  local item name cfg json t0 rc
  for item in "${REPORTS[@]}"; do
    name=${item%%:*}
    cfg=${item#*:}
    json="$OUT/model_report_$name.json"
    if [[ -f $json ]]; then
      echo "skip report model_report_$name: results exist ($json)"
      continue
    fi
    echo "run report model_report_$name ($cfg)"
    t0=$SECONDS
    rc=0
    local lat=()
    ((REPORT_LATENCY)) && lat=(--latency)
    "$PY" -m rkd_jax.report --config "$cfg" "${lat[@]}" --json "$json.tmp" \
      >"$OUT/model_report_$name.txt" 2>"$ROOT/logs/model_report_$name.log" || rc=$?
    if ((rc != 0)); then
      tail -n 30 "$ROOT/logs/model_report_$name.log" >&2 || true
      echo "launch.sh: FAILED in stage report: model report $cfg exited with $rc" >&2
      exit 1
    fi
    mv "$json.tmp" "$json"
    record_time report "model_report_$name" $((SECONDS - t0)) ok
    cat "$OUT/model_report_$name.txt"
  done
  # The table is regenerated whenever a results file, config or model report is newer.
  local table="$OUT/table1.md" newer=""
  if [[ -f $table && -f $OUT/table1_miou.png ]]; then
    newer=$(find "$ROOT" "$OUT" \( -name '*.json' -o -name stage_times.tsv \) -newer "$table" \
      -not -path '*/checkpoints/*' -not -path '*/jax_cache/*' -not -path '*/text_cache/*' \
      -not -name table1.json \
      -print -quit)
    if [[ -z $newer ]]; then
      echo "skip report table1: results exist ($table)"
      echo "stage report: $OUT"
      return
    fi
  fi
  echo "run report table1"
  cp "$ROOT/launch.json" "$ARCHIVE/launch.json"
  "$PY" -m rkd_jax.table --root "$ARCHIVE" --out "$OUT" --seeds "$SEEDS" \
    --datasets "${DATASETS[@]}" --splits "${SPLITS[@]}" ||
    { echo "launch.sh: FAILED in stage report: python -m rkd_jax.table" >&2; exit 1; }
  echo "stage report: $table, $OUT/table1_miou.png, $OUT/model_report_*.{json,txt}"
}

echo "launch.sh: setting $SETTING, seeds $SEEDS, datasets ${DATASETS[*]}, splits ${SPLITS[*]}"
echo "launch.sh: runs in $ROOT, report in $OUT, stages ${WANT[*]}"
for STAGE in "${ALL_STAGES[@]}"; do
  wanted "$STAGE" || continue
  t_stage=$SECONDS
  case "$STAGE" in
    data) data_stage ;;
    sweep) sweep_stage ;;
    eval) eval_stage ;;
    report) report_stage ;;
    *) train_stage "$STAGE" ;;
  esac
  echo "stage $STAGE finished in $((SECONDS - t_stage))s"
done
echo "launch.sh: done"
