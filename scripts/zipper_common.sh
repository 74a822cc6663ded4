# Sourced by the Zipper-LoRA scripts (issue 3): the stage-2 settings every method is trained with, in one place.
ZASR=.venv/bin/zipper-asr
STEPS="${STAGE2_STEPS:-250}"
EVAL_EVERY="${STAGE2_EVAL_EVERY:-50}"
# Languages sampled with p ∝ n_l^0.5 in stage 2 (every method alike): at the natural mix (τ = 1) the
# extremely low tier would be 0.8 % of the rows; at τ = 0.5 it is about 6 %.
TEMPERATURE="${STAGE2_SAMPLING_TEMPERATURE:-0.5}"

# Train one method from runs/stage1 and evaluate it on the test split; skipped when already evaluated.
train_and_eval() {  # variant init_b [seed]
    local seed="${3:-0}"
    local run="runs/stage2/$1-$2"
    [ "$seed" = 0 ] || run="$run-seed$seed"
    [ -f "$run/eval-test.json" ] && return
    $ZASR train-adapters --variant "$1" --init-b "$2" --steps "$STEPS" --eval-every "$EVAL_EVERY" \
        --sampling-temperature "$TEMPERATURE" --seed "$seed" --out "$run"
    $ZASR eval --model "$run/model" --split test --out "$run/eval-test"
}
