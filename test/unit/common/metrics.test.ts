import { describe, expect, it } from "vitest";
import { Code } from "@connectrpc/connect";
import { MetricsRegistry, createMetricsRegistry, createRpcMetrics } from "../../../src/common/metrics.js";

describe("metrics registry", () => {
  it("renders counters, gauges and cumulative histograms in the text format", async () => {
    const r = new MetricsRegistry();
    const c = r.counter("kmi_things_total", "Things.\nSecond line.", ["kind"]);
    c.labels('a"b').inc();
    c.labels('a"b').inc(2);
    r.gauge("kmi_level", "Level.").set(1.5);
    const h = r.histogram("kmi_seconds", "Seconds.", [], [0.1, 1]);
    h.observe(0.05);
    h.observe(0.5);
    h.observe(5);
    expect(await r.render()).toBe(
      [
        "# HELP kmi_things_total Things.\\nSecond line.",
        "# TYPE kmi_things_total counter",
        'kmi_things_total{kind="a\\"b"} 3',
        "",
        "# HELP kmi_level Level.",
        "# TYPE kmi_level gauge",
        "kmi_level 1.5",
        "",
        "# HELP kmi_seconds Seconds.",
        "# TYPE kmi_seconds histogram",
        'kmi_seconds_bucket{le="0.1"} 1',
        'kmi_seconds_bucket{le="1"} 2',
        'kmi_seconds_bucket{le="+Inf"} 3',
        "kmi_seconds_sum 5.55",
        "kmi_seconds_count 3",
        "",
      ].join("\n"),
    );
  });

  it("refuses bad names, wrong label counts, a decreasing counter and a conflicting re-registration", () => {
    const r = new MetricsRegistry();
    expect(() => r.counter("bad-name", "x")).toThrow("Invalid metric name");
    const c = r.counter("ok_total", "x", ["a"]);
    expect(() => c.labels()).toThrow("Invalid number of arguments (0)");
    expect(() => c.labels("v").inc(-1)).toThrow("It is not possible to decrease a counter");
    expect(r.counter("ok_total", "x", ["a"])).toBe(c);
    expect(() => r.gauge("ok_total", "x", ["a"])).toThrow("metric ok_total is registered already with another type or labels");
  });

  it("records per-RPC metrics with gRPC code names", async () => {
    const r = new MetricsRegistry();
    const m = createRpcMetrics(r).method("kmi.agent.v1.KeyAgentService", "Sign", "unary");
    m.started();
    m.handled(0, 0.001);
    m.started();
    m.handled(Code.PermissionDenied, 0.002);
    const text = await r.render();
    expect(text).toContain('grpc_server_started_total{grpc_type="unary",grpc_service="kmi.agent.v1.KeyAgentService",grpc_method="Sign"} 2');
    expect(text).toContain('grpc_server_handled_total{grpc_type="unary",grpc_service="kmi.agent.v1.KeyAgentService",grpc_method="Sign",grpc_code="OK"} 1');
    expect(text).toContain('grpc_server_handled_total{grpc_type="unary",grpc_service="kmi.agent.v1.KeyAgentService",grpc_method="Sign",grpc_code="PermissionDenied"} 1');
    expect(text).toContain("grpc_server_in_flight 0");
  });

  it("a program's registry has the build info, CPU time as a counter and the event loop's lag", async () => {
    const text = await createMetricsRegistry().render();
    expect(text).toMatch(/^kmi_build_info\{version="[^"]+"\} 1$/m);
    expect(text).toContain("# TYPE process_cpu_seconds_total counter");
    expect(text).toMatch(/^process_cpu_seconds_total [0-9.e-]+$/m);
    expect(text).toContain("# TYPE nodejs_eventloop_lag_seconds gauge");
    expect(text).toMatch(/^nodejs_eventloop_lag_p99_seconds [0-9.e-]+$/m);
    for (const name of ["process_start_time_seconds", "process_resident_memory_bytes", "nodejs_heap_used_bytes"]) expect(text).toMatch(new RegExp(`^${name} [0-9.e+-]+$`, "m"));
  });
});
