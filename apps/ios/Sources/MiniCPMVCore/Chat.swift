import Foundation

/// One chat turn end to end, the host half the app owns: image -> slices -> vision features,
/// prompt with expanded placeholders -> token ids, splice, generate, stream text. The same steps as
/// edge_runtime/session.py, built from the core's parts, so the kit checks each part.
/// I/O free: the caller reads the bundle's files and hands their text over (BundleTexts).

/// The text files of a bundle the host half needs (the graphs are the engine's).
public struct BundleTexts: Sendable {
    public var tokenizerJSON: String
    /// nil when the bundle has none (the defaults then apply, as in Python).
    public var tokenizerConfigJSON: String?
    public var generationConfigJSON: String?
    public var chatTemplate: String

    public init(
        tokenizerJSON: String, tokenizerConfigJSON: String?, generationConfigJSON: String?, chatTemplate: String
    ) {
        self.tokenizerJSON = tokenizerJSON
        self.tokenizerConfigJSON = tokenizerConfigJSON
        self.generationConfigJSON = generationConfigJSON
        self.chatTemplate = chatTemplate
    }

    /// Reads the files from a bundle directory (tokenizer.json and the template are required).
    public init(bundle: URL, manifest: BundleManifest) throws {
        func read(_ name: String, required: Bool) throws -> String? {
            let url = bundle.appendingPathComponent(name)
            guard FileManager.default.fileExists(atPath: url.path) else {
                if required { throw CoreError.invalid("\(bundle.lastPathComponent): \(name) is missing") }
                return nil
            }
            return try String(contentsOf: url, encoding: .utf8)
        }
        self.init(
            tokenizerJSON: try read("tokenizer.json", required: true)!,
            tokenizerConfigJSON: try read("tokenizer_config.json", required: false),
            generationConfigJSON: try read("generation_config.json", required: false),
            chatTemplate: try read(manifest.chatTemplateFile, required: true)!)
    }
}

/// What the UI shows and the device report records for one turn.
public struct ChatStats: Sendable {
    public var tokenIds: [Int] = []
    public var text = ""
    public var promptIds: [Int] = []
    public var stopReason: StopReason = .maxNewTokens
    /// Image decode excluded: preprocessing + vision + prefill + first sample, in ms.
    public var ttftMs = 0.0
    public var preprocessMs = 0.0
    public var visionMs = 0.0
    public var prefillMs = 0.0
    public var firstSampleMs = 0.0
    public var decodeTokS = 0.0
    public var decodeTokens = 0
    /// Raw logits of each step, when asked for (tests).
    public var logits: [[Float]] = []

    public init() {}
}

/// A prepared turn: its prompt and the sliced images (the vision graph's inputs).
public struct PreparedTurn: Sendable {
    public var prompt: Prompt
    public var images: [PreparedImage]
}

public struct AskOptions: Sendable {
    public var sampling = SamplingConfig()
    public var downsampleMode: DownsampleMode?
    public var maxSliceNums: Int?
    public var recordLogits = false
    /// Timing runs: decode exactly maxNewTokens steps, through stop tokens.
    public var ignoreStopTokens = false

    public init() {}
}

public final class ChatSession {
    public let engine: Engine
    public let tokenizer: Tokenizer
    public let prompts: PromptBuilder
    public let sliceConfig: SliceConfig
    public let stopIds: [Int]
    private let clock: Clock

    public init(
        engine: Engine, texts: BundleTexts, sliceConfig: SliceConfig, stopIds: [Int],
        clock: @escaping Clock = monotonicMs
    )
        throws
    {
        self.engine = engine
        self.clock = clock
        self.sliceConfig = sliceConfig
        self.stopIds = stopIds
        tokenizer = try Tokenizer(
            tokenizerJSON: texts.tokenizerJSON, tokenizerConfigJSON: texts.tokenizerConfigJSON,
            generationConfigJSON: texts.generationConfigJSON)
        prompts = try PromptBuilder(
            tokenizer: tokenizer, chatTemplate: texts.chatTemplate, useImageId: sliceConfig.useImageId)
        let imageId = try tokenizer.id(named: "image_token")
        guard imageId == engine.info.imageTokenId else {
            throw CoreError.invalid(
                "tokenizer's image token id \(imageId) is not the model's \(engine.info.imageTokenId): tokenizer and bundle disagree"
            )
        }
    }

    public convenience init(
        engine: Engine, manifest: BundleManifest, texts: BundleTexts, clock: @escaping Clock = monotonicMs
    ) throws {
        try self.init(
            engine: engine, texts: texts, sliceConfig: manifest.sliceConfig, stopIds: manifest.stopIds, clock: clock)
    }

    /// Slice the images and build the prompt (no model call).
    public func prepare(_ question: String, images: [ImagePixels], options: AskOptions = AskOptions()) throws
        -> PreparedTurn
    {
        let cfg = try sliceConfig.with(
            downsampleMode: options.downsampleMode ?? sliceConfig.downsampleMode,
            maxSliceNums: options.maxSliceNums ?? sliceConfig.maxSliceNums)
        let prepared = try images.map { try Slicing.preprocess($0, config: cfg) }
        let prompt = try prompts.chat(question, images: prepared.map { ImageLayout(plan: $0.plan) })
        return PreparedTurn(prompt: prompt, images: prepared)
    }

    /// The vision features of every slice of every image, in prompt order (one engine call per slice).
    public func visionFeatures(_ turn: PreparedTurn) async throws -> [[Float]] {
        var features = [[Float]]()
        for image in turn.images {
            for slice in image.slices {
                features.append(
                    try await engine.visionEncoder(
                        patches: slice.patches, positionIds: slice.positionIds, mode: image.downsampleMode))
            }
        }
        return features
    }

    /// One turn: onPiece sees the answer's text as it streams.
    public func ask(
        _ question: String, images: [ImagePixels], options: AskOptions = AskOptions(),
        onPiece: (String) -> Void = { _ in }
    ) async throws -> ChatStats {
        let t0 = clock()
        let turn = try prepare(question, images: images, options: options)
        let t1 = clock()
        let features = try await visionFeatures(turn)
        let t2 = clock()
        let embeds = try await Generator.spliceEmbeddings(
            engine, promptIds: turn.prompt.ids, features: features, placeholderId: engine.info.imageTokenId)
        let t3 = clock()
        let sampling = options.sampling
        let stops = sampling.stopIds.isEmpty ? stopIds : sampling.stopIds
        let limits = GenerationLimits(
            maxNewTokens: sampling.maxNewTokens, stopIds: options.ignoreStopTokens ? [] : stops)
        var decoder = StreamDecoder(tokenizer: tokenizer)
        var text = ""
        var sampler = try Sampler(config: sampling, promptIds: turn.prompt.ids)
        let result = try await Generator.generate(
            engine, embeds: embeds, sampler: &sampler, limits: limits, recordLogits: options.recordLogits, clock: clock
        ) { token in
            let piece = decoder.push(token)
            if !piece.isEmpty {
                text += piece
                onPiece(piece)
            }
        }
        let tail = decoder.flush()
        if !tail.isEmpty {
            text += tail
            onPiece(tail)
        }
        var stats = ChatStats()
        stats.text = text
        stats.tokenIds = result.tokenIds
        stats.promptIds = turn.prompt.ids
        stats.stopReason = result.stopReason
        stats.preprocessMs = t1 - t0
        stats.visionMs = t2 - t1
        stats.prefillMs = result.prefillMs
        stats.ttftMs = (t3 - t0) + result.ttftMs
        stats.firstSampleMs = result.firstSampleMs
        stats.decodeTokS = result.decodeTokS
        stats.decodeTokens = result.stepMs.count
        stats.logits = result.logits
        return stats
    }
}
