/**
 * gRPC server reflection, `grpc.reflection.v1` and `grpc.reflection.v1alpha`, so that `buf curl`
 * and `grpcurl` can list and call every method without the .proto files.
 *
 * Built from the generated descriptors (protobuf-es keeps each file's FileDescriptorProto), with
 * their transitive dependencies (google/protobuf/timestamp.proto and friends). Written once in
 * Connect's handler style; both server stacks serve it.
 */
import { create, toBinary, type DescEnum, type DescFile, type DescMessage, type DescService } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { Code, type ServiceImpl } from "@connectrpc/connect";
import * as v1 from "../gen/grpc/reflection/v1/reflection_pb.js";
import * as v1alpha from "../gen/grpc/reflection/v1alpha/reflection_pb.js";

/** The two reflection services (v1 first). */
export const REFLECTION_SERVICES: readonly DescService[] = [v1.ServerReflection, v1alpha.ServerReflection];

/** What reflection knows: the services served and every file they need. */
export interface ReflectionIndex {
  /** Fully-qualified names of the services served, sorted. */
  readonly serviceNames: readonly string[];
  /** A file by its name (`kmi/agent/v1/agent.proto`). */
  fileByName(name: string): DescFile | undefined;
  /** The file that declares a fully-qualified symbol (service, method, message, field, enum, enum value, extension). */
  fileBySymbol(symbol: string): DescFile | undefined;
  /** The file that declares extension `number` of message `extendee`. */
  fileByExtension(extendee: string, number: number): DescFile | undefined;
  /** Extension numbers of a message, or undefined when the message is unknown. */
  extensionNumbers(typeName: string): number[] | undefined;
  /** The serialized FileDescriptorProto of a file (computed once). */
  serialized(file: DescFile): Uint8Array;
}

function protoName(file: DescFile): string {
  return file.proto.name;
}

/** Builds the index of `services` (their files and all transitive dependencies). */
export function createReflectionIndex(services: readonly DescService[]): ReflectionIndex {
  const files = new Map<string, DescFile>();
  const symbols = new Map<string, DescFile>();
  const extensions = new Map<string, DescFile>();
  const extensionNumbers = new Map<string, number[]>();
  const messages = new Set<string>();
  const bytes = new Map<DescFile, Uint8Array>();

  const addEnum = (file: DescFile, e: DescEnum, scope: string) => {
    symbols.set(e.typeName, file);
    // Enum values are scoped like siblings of their enum.
    for (const v of e.values) symbols.set(scope === "" ? v.name : `${scope}.${v.name}`, file);
  };
  const addMessage = (file: DescFile, m: DescMessage) => {
    symbols.set(m.typeName, file);
    messages.add(m.typeName);
    for (const f of m.fields) symbols.set(`${m.typeName}.${f.name}`, file);
    for (const o of m.oneofs) symbols.set(`${m.typeName}.${o.name}`, file);
    for (const n of m.nestedMessages) addMessage(file, n);
    for (const e of m.nestedEnums) addEnum(file, e, m.typeName);
    for (const x of m.nestedExtensions) symbols.set(x.typeName, file);
  };
  const addFile = (file: DescFile) => {
    if (files.has(protoName(file))) return;
    files.set(protoName(file), file);
    for (const dep of file.dependencies) addFile(dep);
    const pkg = file.proto.package;
    for (const m of file.messages) addMessage(file, m);
    for (const e of file.enums) addEnum(file, e, pkg);
    for (const s of file.services) {
      symbols.set(s.typeName, file);
      for (const m of s.methods) symbols.set(`${s.typeName}.${m.name}`, file);
    }
    for (const x of file.extensions) symbols.set(x.typeName, file);
  };
  for (const s of services) addFile(s.file);
  // Extensions are indexed once every file is in, so that the extendee is known.
  const allExtensions = (file: DescFile) => {
    const out = [...file.extensions];
    const walk = (m: DescMessage) => {
      out.push(...m.nestedExtensions);
      m.nestedMessages.forEach(walk);
    };
    file.messages.forEach(walk);
    return out;
  };
  for (const file of files.values()) {
    for (const x of allExtensions(file)) {
      extensions.set(`${x.extendee.typeName}#${x.number}`, file);
      const list = extensionNumbers.get(x.extendee.typeName) ?? [];
      list.push(x.number);
      extensionNumbers.set(x.extendee.typeName, list);
    }
  }
  const serviceNames = [...new Set(services.map((s) => s.typeName))].sort();
  return {
    serviceNames,
    fileByName: (name) => files.get(name),
    fileBySymbol: (symbol) => symbols.get(symbol.startsWith(".") ? symbol.slice(1) : symbol),
    fileByExtension: (extendee, number) => extensions.get(`${extendee}#${number}`),
    extensionNumbers: (typeName) => (messages.has(typeName) ? [...(extensionNumbers.get(typeName) ?? [])] : undefined),
    serialized(file) {
      let b = bytes.get(file);
      if (b === undefined) {
        b = toBinary(FileDescriptorProtoSchema, file.proto);
        bytes.set(file, b);
      }
      return b;
    },
  };
}

/** The oneof of a reflection request, common to v1 and v1alpha. */
type AnyRequest =
  | { case: "fileByFilename"; value: string }
  | { case: "fileContainingSymbol"; value: string }
  | { case: "fileContainingExtension"; value: { containingType: string; extensionNumber: number } }
  | { case: "allExtensionNumbersOfType"; value: string }
  | { case: "listServices"; value: string }
  | { case: undefined; value?: undefined };

/** The oneof of a reflection response, as a plain init object common to v1 and v1alpha. */
type AnyResponse =
  | { case: "fileDescriptorResponse"; value: { fileDescriptorProto: Uint8Array[] } }
  | { case: "allExtensionNumbersResponse"; value: { baseTypeName: string; extensionNumber: number[] } }
  | { case: "listServicesResponse"; value: { service: { name: string }[] } }
  | { case: "errorResponse"; value: { errorCode: number; errorMessage: string } };

function notFound(message: string): AnyResponse {
  return { case: "errorResponse", value: { errorCode: Code.NotFound, errorMessage: message } };
}

/**
 * The requested file, then each transitive dependency not yet sent on this stream (as grpc-go
 * does), so a client can build its descriptor pool from one answer.
 */
function filesResponse(index: ReflectionIndex, file: DescFile, sent: Set<string>): AnyResponse {
  const out: Uint8Array[] = [index.serialized(file)];
  sent.add(protoName(file));
  const walk = (f: DescFile) => {
    for (const dep of f.dependencies) {
      if (sent.has(protoName(dep))) continue;
      sent.add(protoName(dep));
      out.push(index.serialized(dep));
      walk(dep);
    }
  };
  walk(file);
  return { case: "fileDescriptorResponse", value: { fileDescriptorProto: out } };
}

/** Answers one reflection request. */
function answer(index: ReflectionIndex, req: AnyRequest, sent: Set<string>): AnyResponse {
  switch (req.case) {
    case "listServices":
      return { case: "listServicesResponse", value: { service: index.serviceNames.map((name) => ({ name })) } };
    case "fileByFilename": {
      const f = index.fileByName(req.value);
      return f ? filesResponse(index, f, sent) : notFound(`file "${req.value}" not found`);
    }
    case "fileContainingSymbol": {
      const f = index.fileBySymbol(req.value);
      return f ? filesResponse(index, f, sent) : notFound(`symbol "${req.value}" not found`);
    }
    case "fileContainingExtension": {
      const { containingType, extensionNumber } = req.value;
      const f = index.fileByExtension(containingType, extensionNumber);
      return f ? filesResponse(index, f, sent) : notFound(`extension ${extensionNumber} of "${containingType}" not found`);
    }
    case "allExtensionNumbersOfType": {
      const numbers = index.extensionNumbers(req.value);
      return numbers
        ? { case: "allExtensionNumbersResponse", value: { baseTypeName: req.value, extensionNumber: numbers } }
        : notFound(`type "${req.value}" not found`);
    }
    default:
      return { case: "errorResponse", value: { errorCode: Code.InvalidArgument, errorMessage: "reflection request has no message_request set" } };
  }
}

/** `grpc.reflection.v1.ServerReflection` over `index`. */
export function createReflectionV1(index: ReflectionIndex): ServiceImpl<typeof v1.ServerReflection> {
  return {
    async *serverReflectionInfo(requests) {
      const sent = new Set<string>();
      for await (const req of requests) {
        yield create(v1.ServerReflectionResponseSchema, {
          validHost: req.host,
          originalRequest: req,
          // The plain init object is the same shape for v1 and v1alpha.
          messageResponse: answer(index, req.messageRequest, sent) as never,
        });
      }
    },
  };
}

/** `grpc.reflection.v1alpha.ServerReflection` over `index` (older clients, grpcurl before 1.8). */
export function createReflectionV1alpha(index: ReflectionIndex): ServiceImpl<typeof v1alpha.ServerReflection> {
  return {
    async *serverReflectionInfo(requests) {
      const sent = new Set<string>();
      for await (const req of requests) {
        yield create(v1alpha.ServerReflectionResponseSchema, {
          validHost: req.host,
          originalRequest: req,
          messageResponse: answer(index, req.messageRequest, sent) as never,
        });
      }
    },
  };
}
