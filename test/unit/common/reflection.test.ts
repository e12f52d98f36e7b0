import { fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { createClient, createRouterTransport } from "@connectrpc/connect";
import { describe, expect, it } from "vitest";
import { REFLECTION_SERVICES, createReflectionIndex, createReflectionV1, createReflectionV1alpha } from "../../../src/common/reflection.js";
import { Health } from "../../../src/gen/grpc/health/v1/health_pb.js";
import * as v1 from "../../../src/gen/grpc/reflection/v1/reflection_pb.js";
import * as v1alpha from "../../../src/gen/grpc/reflection/v1alpha/reflection_pb.js";
import { KeyAgentService } from "../../../src/gen/kmi/agent/v1/agent_pb.js";
import { KdcService } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";

const index = createReflectionIndex([KeyAgentService, KdcService, Health, ...REFLECTION_SERVICES]);

describe("reflection index", () => {
  it("lists the services served", () => {
    expect(index.serviceNames).toEqual([
      "grpc.health.v1.Health",
      "grpc.reflection.v1.ServerReflection",
      "grpc.reflection.v1alpha.ServerReflection",
      "kmi.agent.v1.KeyAgentService",
      "kmi.kdc.v1.KdcService",
    ]);
  });

  it.each([
    ["kmi.agent.v1.KeyAgentService", "kmi/agent/v1/agent.proto"],
    ["kmi.agent.v1.KeyAgentService.Sign", "kmi/agent/v1/agent.proto"],
    ["kmi.agent.v1.SignRequest", "kmi/agent/v1/agent.proto"],
    ["kmi.agent.v1.SignRequest.key_id", "kmi/agent/v1/agent.proto"],
    ["kmi.agent.v1.KeyState", "kmi/agent/v1/agent.proto"],
    ["kmi.agent.v1.KEY_STATE_ACTIVE", "kmi/agent/v1/agent.proto"],
    [".kmi.agent.v1.SignRequest", "kmi/agent/v1/agent.proto"],
    ["grpc.health.v1.HealthCheckResponse.ServingStatus", "grpc/health/v1/health.proto"],
    ["grpc.health.v1.HealthCheckResponse.SERVING", "grpc/health/v1/health.proto"],
    ["google.protobuf.Timestamp", "google/protobuf/timestamp.proto"],
    ["kmi.common.v1.CertificateInfo", "kmi/common/v1/common.proto"],
  ])("finds the file declaring %s", (symbol, file) => {
    expect(index.fileBySymbol(symbol)?.proto.name).toBe(file);
  });

  it("knows the transitive dependencies by file name and nothing else", () => {
    expect(index.fileByName("google/protobuf/timestamp.proto")).toBeDefined();
    expect(index.fileByName("kmi/common/v1/common.proto")).toBeDefined();
    expect(index.fileByName("kmi/audit/v1/audit.proto")).toBeUndefined();
    expect(index.fileBySymbol("kmi.audit.v1.AuditService")).toBeUndefined();
  });
});

describe.each([
  ["v1", v1, createReflectionV1(index)],
  ["v1alpha", v1alpha, createReflectionV1alpha(index)],
] as const)("reflection %s service", (_name, mod, impl) => {
  const transport = createRouterTransport((r) => r.service(mod.ServerReflection as typeof v1.ServerReflection, impl as ReturnType<typeof createReflectionV1>));
  const client = createClient(mod.ServerReflection as typeof v1.ServerReflection, transport);

  async function ask(reqs: v1.ServerReflectionRequest["messageRequest"][]) {
    async function* requests() {
      for (const r of reqs) yield { host: "h", messageRequest: r };
    }
    const out = [];
    for await (const res of client.serverReflectionInfo(requests())) out.push(res);
    return out;
  }

  it("answers list_services, then files with dependencies not yet sent on the stream", async () => {
    const [list, agent, again] = await ask([
      { case: "listServices", value: "" },
      { case: "fileContainingSymbol", value: "kmi.agent.v1.KeyAgentService.GetStatus" },
      { case: "fileByFilename", value: "kmi/agent/v1/agent.proto" },
    ]);
    expect(list!.validHost).toBe("h");
    expect(list!.messageResponse.case).toBe("listServicesResponse");
    expect(list!.messageResponse.case === "listServicesResponse" && list!.messageResponse.value.service.map((s) => s.name)).toContain("kmi.agent.v1.KeyAgentService");
    const names = (r: typeof agent) =>
      r!.messageResponse.case === "fileDescriptorResponse" ? r!.messageResponse.value.fileDescriptorProto.map((b) => fromBinary(FileDescriptorProtoSchema, b).name) : [];
    expect(names(agent)).toEqual(["kmi/agent/v1/agent.proto", "google/protobuf/timestamp.proto", "kmi/common/v1/common.proto"]);
    expect(names(again)).toEqual(["kmi/agent/v1/agent.proto"]);
    expect(agent!.originalRequest?.messageRequest.case).toBe("fileContainingSymbol");
  });

  it("answers unknown names with a NOT_FOUND error_response and keeps the stream", async () => {
    const [a, b, c] = await ask([
      { case: "fileContainingSymbol", value: "no.such.Symbol" },
      { case: "fileByFilename", value: "nope.proto" },
      { case: "allExtensionNumbersOfType", value: "kmi.agent.v1.SignRequest" },
    ]);
    expect(a!.messageResponse).toEqual({ case: "errorResponse", value: expect.objectContaining({ errorCode: 5, errorMessage: 'symbol "no.such.Symbol" not found' }) });
    expect(b!.messageResponse).toEqual({ case: "errorResponse", value: expect.objectContaining({ errorCode: 5, errorMessage: 'file "nope.proto" not found' }) });
    expect(c!.messageResponse).toEqual({
      case: "allExtensionNumbersResponse",
      value: expect.objectContaining({ baseTypeName: "kmi.agent.v1.SignRequest", extensionNumber: [] }),
    });
  });
});
