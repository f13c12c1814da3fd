import Foundation

/// The part of a Core ML bundle's manifest.json (docs/bundle.md, docs/coreml.md) the app reads:
/// what the bundle is (family, format, quantization, its checksum for the device report), the three
/// packages and their functions, the decoder states, the prompt's stop ids, the preprocessing
/// settings. Refuses what it cannot run with one clear message instead of failing later in Core ML.
public struct BundleManifest: Sendable {
    public static let schemaVersion = 1

    public struct StateSpec: Sendable, Equatable {
        public let name: String
        public let shape: [Int]
        public let dtype: String
        /// The MLState buffer name (the state's name with "." -> "__").
        public let coreMLName: String
    }

    /// The Core ML packages and functions (manifest `graphs`, format coreml).
    public struct CoreMLGraphs: Sendable, Equatable {
        public let visionFile: String
        /// downsample mode -> function of vision_encoder.mlpackage
        public let visionFunctions: [DownsampleMode: String]
        /// Largest L the vision functions take (num_patches_per_side^2).
        public let maxPatches: Int
        public let embeddingFile: String
        public let decoderFile: String
        public let prefillFunction: String
        public let decodeFunction: String
        /// Rows the prefill function takes (the decode function takes 1).
        public let prefillChunk: Int
    }

    public let family: String
    public let target: String
    public let format: String
    public let quantization: String
    /// The manifest's own checksum ("" for a bundle written before manifests were signed).
    public let manifestSha256: String
    public let info: ModelInfo
    public let numPatchesPerSide: Int
    public let graphs: CoreMLGraphs
    public let state: [StateSpec]
    public let sliceConfig: SliceConfig
    public let chatTemplateFile: String
    public let stopIds: [Int]
    /// Paths the bundle lists (relative to its directory).
    public let files: Set<String>

    /// Parse manifest.json; `where` names the file in errors. Only Core ML bundles run in this app.
    public init(data: Data, where path: String = "manifest.json") throws {
        let raw = try JSONObject.parse(data, path)
        let version = try raw.int("schema_version")
        guard version == BundleManifest.schemaVersion else {
            throw CoreError.invalid(
                "\(path): schema_version \(version), this app reads \(BundleManifest.schemaVersion)")
        }
        format = try raw.string("format")
        target = (try raw.optionalString("target")) ?? ""
        guard format == "coreml" else {
            throw CoreError.invalid(
                "\(path): a \(format) bundle (target \(target)); this app runs coreml bundles "
                    + "(minicpmv-edge export --target ios)")
        }
        let missing = ["model", "graphs", "state", "prompt", "preprocessing", "files"].filter { !raw.has($0) }
        guard missing.isEmpty else {
            throw CoreError.invalid("\(path): missing \(missing.joined(separator: ", "))")
        }
        family = try raw.string("family")
        quantization = try raw.string("quantization")
        manifestSha256 = (try raw.optionalString("manifest_sha256")) ?? ""
        let model = try raw.object("model")
        // Canvas M-RoPE (MiniCPM-V 4.7): the host computes three RoPE rows per token from the
        // prompt's image layout and feeds them as the decoder's position_ids. This app does not
        // compute them yet, so such a bundle is refused before any package loads rather than
        // answering with wrong positions. Absent (bundles written before the field): the cache index.
        let rope = (try model.optionalString("rope_positions")) ?? "cache"
        guard rope == "cache" else {
            throw CoreError.invalid(
                "\(path): \(family) positions RoPE by host-computed \(rope) rows (model.rope_positions \"\(rope)\"), "
                    + "which this app does not compute yet; run this bundle with minicpmv-edge chat --bundle")
        }
        let g = try raw.object("graphs")
        let vision = try g.object("vision_encoder")
        let decoder = try g.object("text_decoder")
        let decoderFunctions = try decoder.object("functions")
        var visionFunctions = [DownsampleMode: String]()
        for (mode, fn) in try vision.object("functions").raw {
            guard let name = fn as? String else {
                throw CoreError.invalid("\(path): graphs.vision_encoder.functions.\(mode) must be a string")
            }
            visionFunctions[try DownsampleMode(parsing: mode)] = name
        }
        graphs = CoreMLGraphs(
            visionFile: try vision.string("file"), visionFunctions: visionFunctions,
            maxPatches: try vision.int("max_patches"), embeddingFile: try g.object("token_embedding").string("file"),
            decoderFile: try decoder.string("file"), prefillFunction: try decoderFunctions.string("prefill"),
            decodeFunction: try decoderFunctions.string("decode"),
            prefillChunk: try decoder.object("chunk").int("prefill"))
        info = ModelInfo(
            family: family, hiddenSize: try model.int("hidden_size"), vocabSize: try model.int("vocab_size"),
            maxContext: try raw.int("max_context"), chunkSize: graphs.prefillChunk,
            patchSize: try model.int("patch_size"), imageTokenId: try model.int("image_token_id"),
            videoTokenId: try model.int("video_token_id"))
        numPatchesPerSide = try model.int("num_patches_per_side")
        state = try raw.objects("state").map {
            StateSpec(
                name: try $0.string("name"), shape: try $0.ints("shape"), dtype: try $0.string("dtype"),
                coreMLName: try $0.string("coreml_name"))
        }
        sliceConfig = try SliceConfig(json: raw.object("preprocessing").raw, numPatchesPerSide: numPatchesPerSide)
        let prompt = try raw.object("prompt")
        chatTemplateFile = try prompt.string("chat_template")
        stopIds = try prompt.ints("stop_ids")
        files = Set(try raw.object("files").raw.keys)
        for file in [graphs.visionFile, graphs.embeddingFile, graphs.decoderFile, chatTemplateFile]
        where !files.contains(where: { $0 == file || $0.hasPrefix(file + "/") }) {
            throw CoreError.invalid("\(path): graph file \(file) is not among the bundle's files")
        }
    }

    /// The vision function of a downsample mode, or a message naming the modes the bundle has.
    public func visionFunction(_ mode: DownsampleMode) throws -> String {
        guard let fn = graphs.visionFunctions[mode] else {
            let modes = graphs.visionFunctions.keys.map(\.rawValue).sorted().joined(separator: ", ")
            throw CoreError.invalid("this bundle has no \(mode.rawValue) vision function (it has \(modes))")
        }
        return fn
    }
}

/// Which compute units each Core ML function runs on, and why. Plain data, so the choice is
/// documented and unit-tested here; CoreMLEngine maps it to MLComputeUnits.
public struct ComputePlan: Sendable, Equatable {
    public enum Units: String, Sendable, CaseIterable {
        case cpuOnly, cpuAndGPU, cpuAndNeuralEngine, all
    }

    public var vision: Units
    public var embedding: Units
    public var decoder: Units

    /// The default: vision on CPU+GPU, embedding and decoder on CPU+Neural Engine.
    public static let `default` = ComputePlan(
        vision: .cpuAndGPU, embedding: .cpuAndNeuralEngine, decoder: .cpuAndNeuralEngine)

    public init(vision: Units, embedding: Units, decoder: Units) {
        self.vision = vision
        self.embedding = embedding
        self.decoder = decoder
    }

    /// Why the defaults are what they are (shown in the app's settings and the README).
    public static let reasons: [String: String] = [
        "vision": "CPU+GPU: MiniCPM-V's official iOS demo turned the Neural Engine off for the vision tower after "
            + "memory grew between slices on it; a slice's L also varies (range dim), which the Neural Engine "
            + "handles worst. One model instance serves every slice of every image.",
        "embedding": "CPU+Neural Engine: a gather, cheap anywhere; kept off the GPU so the vision tower has it.",
        "decoder": "CPU+Neural Engine: fixed shapes (chunk and 1) and fp16 weights/states suit the Neural Engine; "
            + "`all` lets Core ML choose and is the setting to try when a device is slower.",
    ]

    /// Validates that the Core ML input shapes the engine will build fit the functions' declared ranges.
    public static func checkSlice(patchRows: Int, graphs: BundleManifest.CoreMLGraphs, mode: DownsampleMode) throws {
        let step = mode.tokenDivisor
        guard patchRows >= step, patchRows <= graphs.maxPatches, patchRows % step == 0 else {
            throw CoreError.invalid(
                "a slice of \(patchRows) patches is outside the vision function's range (\(step)...\(graphs.maxPatches) "
                    + "in steps of \(step))")
        }
    }
}
