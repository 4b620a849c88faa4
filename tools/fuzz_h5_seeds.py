#!/usr/bin/env python3
# Writes the seed inputs of tests/fuzz/fuzz_h5_artifacts.c into tests/fuzz/corpus/fuzz_h5_artifacts/:
# consistent prompts.h5 files (with and without donors) and round files (head, head with
# compare_importance, edge), in the target's record encoding (see the comment at its top; `names` and
# `strings` must match the target's). Run from the repository root.
import os
names = ["tokens", "types", "index", "lengths", "donors", "donor_kinds", "targets", "target_lengths", "pair_ids",
    "units", "scores", "metrics", "compare/scores", "compare/agreement", "circuit/heads", "circuit/edges", "kept/heads",
    "kept/edges", "format", "task", "tokenizer_path", "inputs_hash", "kind", "method", "stop", "compare_method", "round",
    "pruned"]
strings = ["edgepatch-prompts-1", "edgepatch-prune-round-1", "head", "edge", "attribution", "exact", "min_units", "0123456789abcdef", ""]
def b(v): # small int -> byte
    assert -16 <= v < 0xf0-16; return v+16
def ds(op, name, dims, vals):
    out=[op, names.index(name), len(dims)-1] + list(dims)
    n=1
    for d in dims: n*=d
    assert len(vals)==n, (name,len(vals),n)
    return out+[b(v) if op == 0 else b(int(v*4)) for v in vals]
def sattr(name, s): return [3, names.index(name), 0xc0+strings.index(s)]
def rawstr(name, s): return [3, names.index(name), len(s)] + list(s.encode())
def iattr(name, v): return [4, names.index(name), b(v)]
d='tests/fuzz/corpus/fuzz_h5_artifacts'
def prompts(P=3, L=10, K=2, T=2, N=3):
    lengths=[10,7,9][:P]
    tok=[]; ty=[]; ix=[]
    for p in range(P):
        for i in range(L):
            if i < lengths[p]: tok.append(5+i); ty.append(i%8); ix.append(i//3 if i else -1)
            else: tok.append(-1); ty.append(-1); ix.append(-1)
    don=[]
    for p in range(P):
        for k in range(K):
            don += [t if t<0 else t+k for t in tok[p*L:(p+1)*L]]
    out=[0]
    out+=ds(0,"tokens",[P,L],tok)+ds(0,"types",[P,L],ty)+ds(0,"index",[P,L],ix)+ds(0,"lengths",[P],lengths)
    if K: out+=ds(0,"donors",[P,K,L],don)+ds(0,"donor_kinds",[K],list(range(K)))
    out+=ds(0,"targets",[P,T],[7,8]*P)+ds(0,"target_lengths",[P],[2,1,2][:P])+ds(0,"pair_ids",[P,N],[0,1,2]*P)
    out+=sattr("format","edgepatch-prompts-1")+rawstr("task","country_capital")+rawstr("tokenizer_path","m")+sattr("inputs_hash","0123456789abcdef")
    return bytes(out)
open(d+'/prompts_valid','wb').write(prompts())
open(d+'/prompts_nodonors','wb').write(prompts(K=0))
def rnd(kind="head", compare=False, edges=False):
    Lr,H=2,4
    out=[1]
    units=[]
    for l in range(Lr):
        for h in range(H):
            units += [l,h,6,0] if kind=="head" else [l,h,3,6]
    n=len(units)//4
    out+=ds(0,"units",[n,4],units)+ds(1,"scores",[n],[i%5 for i in range(n)])+ds(1,"metrics",[3,3],[1,0,2,1,1,1,0,1,2])
    out+=ds(0,"circuit/heads",[Lr,H,7],[1]*(Lr*H*7))+ds(0,"kept/heads",[Lr,H,7],[1,0,1,1,0,1,1]*(Lr*H))
    if edges:
        out+=ds(0,"circuit/edges",[Lr,H,8,8],[1]*(Lr*H*64))+ds(0,"kept/edges",[Lr,H,8,8],[i%2 for i in range(Lr*H*64)])
    if compare:
        out+=ds(1,"compare/scores",[n],[i%3 for i in range(n)])+ds(2,"compare/agreement",[4],[1,0,3,4])+sattr("compare_method","exact")
    out+=sattr("format","edgepatch-prune-round-1")+sattr("inputs_hash","0123456789abcdef")+iattr("round",0)+sattr("kind",kind)
    out+=sattr("method","attribution")+iattr("pruned",1)+sattr("stop","min_units")
    return bytes(out)
open(d+'/round_head','wb').write(rnd())
open(d+'/round_head_compare','wb').write(rnd(compare=True))
open(d+'/round_edge','wb').write(rnd(kind="edge",edges=True,compare=True))
