# lib.runTests of the cluster library (nix/lib/cluster.nix): [] when every test passes, else
# the failures with what was expected and what came. tests/nix.rs runs it.
{ lib }:
let
  cluster = import ../../lib/cluster.nix { inherit lib; };
  example = import ../../examples/cloud.nix;
  hosts = cluster.hosts example;
  # The example with one part changed.
  with' = f: lib.recursiveUpdate example f;
  problems = spec: cluster.check spec;
  has = needle: spec: lib.any (lib.hasInfix needle) (problems spec);
in
lib.runTests {
  testExampleIsSound = { expr = problems example; expected = [ ]; };
  testExampleHosts = { expr = lib.attrNames hosts; expected = [ "cp" "w2" "w3" ]; };
  testRoles = {
    expr = lib.mapAttrs (_: h: h.services.llama-orch.role) hosts;
    expected = { cp = "control-plane"; w2 = "worker"; w3 = "worker"; };
  };
  testWorkerDialsItsOwnAddressOfTheControlPlane = {
    expr = map (w: hosts.${w}.services.llama-orch.node.controlPlane) [ "w2" "w3" ];
    expected = [ "https://10.231.2.1:8443" "https://10.231.3.1:8443" ];
  };
  testPoolGetsTheModel = {
    expr = hosts.w2.services.llama-orch.pools.default.model.id;
    expected = "smollm2-135m";
  };
  testDefaultControlPlaneAddressIsTheFirst = {
    expr = (cluster.hosts (example // {
      workers = example.workers // { w3 = removeAttrs example.workers.w3 [ "controlPlaneAddress" ]; };
    })).w3.services.llama-orch.node.controlPlane;
    expected = "https://10.231.2.1:8443";
  };
  testForeignControlPlaneAddress = {
    expr = has "w2.controlPlaneAddress 10.9.9.9 is not one of cluster.controlPlane.addresses" (with' { workers.w2.controlPlaneAddress = "10.9.9.9"; });
    expected = true;
  };
  testDuplicateNodeIds = {
    expr = has "node ids w2 are used by more than one worker" (with' { workers.w3.nodeId = "w2"; });
    expected = true;
  };
  testInvalidNodeId = {
    expr = has "the node id \"w 2\" is not" (with' { workers.w2.nodeId = "w 2"; });
    expected = true;
  };
  testUnknownModel = {
    expr = has "pools.default.model must name one of cluster.models (smollm2)" (with' { workers.w3.pools.default.model = "llama"; });
    expected = true;
  };
  testUnpinnedModel = {
    expr = has "cluster.models.smollm2 (used by cluster.workers.w2.pools.default) is not pinned"
      (example // { models.smollm2 = removeAttrs example.models.smollm2 [ "sha256" ]; });
    expected = true;
  };
  testFetchedModelIsPinned = {
    expr = problems (example // { models.smollm2 = { id = "m"; source = { url = "https://example.org/m.gguf"; sha256 = "0000000000000000000000000000000000000000000000000000000000000000"; }; }; });
    expected = [ ];
  };
  testWorkerWithoutToken = {
    expr = has "cluster.workers.w3.tokenFile is required" (example // { workers = example.workers // { w3 = removeAttrs example.workers.w3 [ "tokenFile" ]; }; });
    expected = true;
  };
  testTlsRequiredUnlessPlaintext = {
    expr = map (s: has "cluster.controlPlane.tls" s) [
      (example // { controlPlane = removeAttrs example.controlPlane [ "tls" ]; })
      (example // { controlPlane = removeAttrs example.controlPlane [ "tls" ]; allowPlaintext = true; })
    ];
    expected = [ true false ];
  };
  testPlaintextClusterUsesHttp = {
    expr = (cluster.hosts (example // { allowPlaintext = true; controlPlane = removeAttrs example.controlPlane [ "tls" ]; })).w2.services.llama-orch.node.controlPlane;
    expected = "http://10.231.2.1:8443";
  };
  testControlPlaneIsNotAWorker = {
    expr = has "cp is the control plane's host" (with' { workers.cp = example.workers.w2; });
    expected = true;
  };
  testNoWorkers = {
    expr = has "cluster.workers is empty" (example // { workers = { }; });
    expected = true;
  };
  testHostsThrowsEveryProblem = {
    expr = (builtins.tryEval (cluster.hosts (example // { workers = { }; }))).success;
    expected = false;
  };
  testNodeTokensText = {
    expr = cluster.nodeTokensText { w2 = "a"; w3 = "b"; };
    expected = "w2 a\nw3 b\n";
  };
  testNodeTokensTextForLimitsEachWorker = {
    expr = cluster.nodeTokensTextFor example { w2 = "a"; w3 = "b"; };
    expected = "w2 a models=smollm2-135m slots=2\nw3 b models=smollm2-135m slots=2\n";
  };
}
