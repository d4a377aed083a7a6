#!/bin/bash
# EMP-SSL lever search on the laptop network: 100 steps of the 1-epoch schedule, one thread each, one after the other.
cd /work/main
common="--recipe laptop --loss emp --num-patches 20 --epochs 1 --max-steps 100 --warmup-epochs 0.05 --num-workers 1 --seed 0 --log-every 5 --knn-every 0 --eval-patches 1,16 --eval-train-images 2000 --eval-test-images 1000 --linear-epochs 30"
run() { name=$1; shift; OMP_NUM_THREADS=1 .venv/bin/python bag_ssl.py $common "$@" --output-dir /work/runs/emp_search/$name > /work/runs/emp_search/$name.log 2>&1; }
# the same network at random initialisation (seed 0), read by the same bag-of-patch evaluation
OMP_NUM_THREADS=1 .venv/bin/python results/co_byol_64px/random_backbone.py /work/runs/emp_search/random_init_s0/random_backbone.pt --recipe laptop --seed 0 > /work/runs/emp_search/random_init_s0.log 2>&1
OMP_NUM_THREADS=1 .venv/bin/python bag_ssl.py --recipe laptop --eval-only --checkpoint /work/runs/emp_search/random_init_s0/random_backbone.pt --eval-crop patch --eval-patch-size 14 --seed 0 --num-workers 1 --eval-patches 1,16 --eval-train-images 2000 --eval-test-images 1000 --linear-epochs 30 --output-dir /work/runs/emp_search/random_init_s0 >> /work/runs/emp_search/random_init_s0.log 2>&1
run lars_lr0.3 --optimizer lars --lr 0.3 --weight-decay 1e-4
run sgd_lr0.5 --optimizer sgd --lr 0.5
run sgd_lr0.005 --optimizer sgd --lr 0.005
run lars_lr0.3_lam50 --optimizer lars --lr 0.3 --weight-decay 1e-4 --emp-lambda 50
