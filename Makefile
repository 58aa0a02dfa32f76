# sslkit: self-supervised pretraining toolkit.  `make install && make test` sets up and checks a fresh clone.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
RUNS ?= runs
# Evaluation targets default to the last run of `make pretrain-dino`.
RUN ?= $(RUNS)/dino_resnet_fmnist-latest
ARGS ?=
export PYTHONUNBUFFERED := 1

.PHONY: help install data test test-slow test-faults lint pretrain-simclr pretrain-dino pretrain-dino-vit \
        pretrain-mae pretrain-byol pretrain-vicreg pretrain-barlow pretrain-mocov3 pretrain-plugin knn linear-probe retrieval curate-demo bench bench-throughput bench-tta gpu-check clean

help:
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

install: data ## install sslkit with dev extras and the pinned torch/torchvision pair
	$(PIP) install -c constraints.txt -e ".[dev]"

data: ## install Fashion-MNIST (Debian package dataset-fashion-mnist)
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: found in /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else \
	  echo "Fashion-MNIST is not installed. Either run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu),"; \
	  echo "or download it with torchvision (torchvision.datasets.FashionMNIST(ROOT, download=True)) and pass data.root=ROOT."; \
	fi

test: ## the test suite (about 5 minutes on 2 cores)
	$(PYTHON) -m pytest -q -m "not slow" $(ARGS)

test-slow: ## the slow tests only
	$(PYTHON) -m pytest -q -m slow $(ARGS)

test-faults: ## fault-injection tests, slow ones included
	$(PYTHON) -m pytest -q tests/faults $(ARGS)

lint: ## ruff
	$(PYTHON) -m ruff check sslkit tests benchmarks examples

pretrain-simclr: ## SimCLR, narrow ResNet on Fashion-MNIST (2-core CPU default), then k-NN vs raw pixels
	sslkit pretrain recipes/simclr_resnet_fmnist.yaml output_dir=$(RUNS) $(ARGS)

pretrain-dino: ## DINO, narrow ResNet on Fashion-MNIST (2-core CPU default), then teacher k-NN vs raw pixels
	sslkit pretrain recipes/dino_resnet_fmnist.yaml output_dir=$(RUNS) $(ARGS)

pretrain-dino-vit: ## DINO, 4-block ViT-Tiny on Fashion-MNIST (2-core CPU, 28 min), then attention and PCA maps on scenes and their Jaccard
	sslkit pretrain recipes/dino_vit_tiny_fmnist.yaml output_dir=$(RUNS) $(ARGS)
	sslkit viz attention $(RUNS)/dino_vit_tiny_fmnist-latest --dataset fmnist_scenes --from-dataset 6 --image-size 64
	sslkit viz pca $(RUNS)/dino_vit_tiny_fmnist-latest --dataset fmnist_scenes --from-dataset 6 --image-size 64
	$(PYTHON) benchmarks/dense_jaccard.py --runs $(RUNS)/dino_vit_tiny_fmnist-latest --num 1000 \
		--out $(RUNS)/dino_vit_tiny_fmnist-latest/jaccard

pretrain-mae: ## MAE, ViT-Tiny on Fashion-MNIST (2-core CPU), then a reconstruction grid
	sslkit pretrain recipes/mae_vit_tiny_fmnist.yaml output_dir=$(RUNS) $(ARGS)
	sslkit viz reconstruct $(RUNS)/mae_vit_tiny_fmnist-latest

pretrain-byol: ## BYOL, narrow ResNet on Fashion-MNIST (2-core CPU, 28 min), then k-NN vs raw pixels
	sslkit pretrain recipes/byol_resnet_fmnist.yaml output_dir=$(RUNS) $(ARGS)

pretrain-vicreg: ## VICReg, narrow ResNet on Fashion-MNIST (2-core CPU, 28 min), then k-NN vs raw pixels
	sslkit pretrain recipes/vicreg_resnet_fmnist.yaml output_dir=$(RUNS) $(ARGS)

pretrain-barlow: ## Barlow Twins, narrow ResNet on Fashion-MNIST (2-core CPU, 28 min), then k-NN vs raw pixels
	sslkit pretrain recipes/barlow_twins_resnet_fmnist.yaml output_dir=$(RUNS) $(ARGS)

pretrain-mocov3: ## MoCo v3, narrow ResNet on Fashion-MNIST (2-core CPU, 28 min), then k-NN vs raw pixels
	sslkit pretrain recipes/moco_v3_resnet_fmnist.yaml output_dir=$(RUNS) $(ARGS)

pretrain-plugin: ## the plug-in example: SimSiam from examples/, loaded through SSLKIT_PLUGINS (10 min)
	SSLKIT_PLUGINS=simsiam_plugin PYTHONPATH=examples sslkit pretrain examples/simsiam_fmnist.yaml output_dir=$(RUNS) $(ARGS)

knn: ## k-NN on frozen features of RUN (default: last DINO run)
	sslkit eval knn $(RUN) $(ARGS)

linear-probe: ## linear probe on frozen features of RUN
	sslkit eval linear $(RUN) $(ARGS)

retrieval: ## FAISS retrieval metrics for RUN
	sslkit eval retrieval $(RUN) $(ARGS)

curate-demo: ## plant duplicates in Fashion-MNIST, dedup, then retrieve around a seed set -> curate_demo/
	$(PYTHON) -m sslkit.curate.demo --out curate_demo --pool-size 3000 $(ARGS)

bench: ## all benchmarks -> bench_out/*.json, Markdown tables and plots (about 2.5 hours on 2 cores)
	$(PYTHON) benchmarks/throughput.py --out bench_out
	$(PYTHON) benchmarks/memory_soak.py --out bench_out
	$(PYTHON) benchmarks/linear_probe.py --out bench_out
	$(PYTHON) benchmarks/retrieval.py --out bench_out
	$(PYTHON) benchmarks/time_to_accuracy.py --out bench_out

bench-throughput: ## sslkit vs lightly training throughput -> bench_out/throughput.{json,md}
	$(PYTHON) benchmarks/throughput.py --out bench_out $(ARGS)

bench-tta: ## time to accuracy of the CPU recipes -> bench_out/time_to_accuracy.{json,md,png} (~90 min)
	$(PYTHON) benchmarks/time_to_accuracy.py --out bench_out $(ARGS)

gpu-check: ## CUDA tests, GPU throughput vs lightly, first steps of the GPU recipes, GPU k-NN -> bench_out/gpu_check.{json,md} (<= 8 min; without a GPU: says so, exits 0)
	$(PYTHON) benchmarks/gpu_check.py --out bench_out/gpu_check.json $(ARGS)

clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
